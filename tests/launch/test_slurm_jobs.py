"""`moslim launch slurm` on a real Slurm (slurmctld + slurmd on this host, started by the session
fixture; no mock): preemption → checkpoint → requeue → resume, dependent pipelines, and the
generated script's two-node rendezvous (two torchrun agents on one host, since Debian's Slurm
runs one slurmd per host)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import RM_TINY, ROOT, eval_report, job_ids, job_output, launch, metric_rows, rm_weights
from moslim_mega.config import SlurmConfig
from moslim_mega.launch.slurm import node_task_lines

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rm_reference(tmp_path_factory):
    """The same 2-rank RM run, uninterrupted, under plain torchrun (one agent, 2 processes)."""
    out = tmp_path_factory.mktemp("rm_reference") / "rm"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "moslim_mega.cli", "rm", "train", "--out", str(out), *RM_TINY],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _assert_same_run(out: Path, ref: Path) -> None:
    assert metric_rows(out) == metric_rows(ref)
    assert eval_report(out) == eval_report(ref)
    got, want = rm_weights(out), rm_weights(ref)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_preempted_job_checkpoints_requeues_and_resumes_bitwise(slurm, rm_reference, tmp_path):
    out = tmp_path / "rm"
    fault = tmp_path / "reached"
    # preempt_wait:3: after step 3 every rank waits until *it* has received the signal; a rank
    # the signal never reaches keeps the job running until the timeout below fails the test.
    submitted = launch(slurm, "--nproc-per-node", "2", "--cpus-per-task", "2", "--time", "10:00",
                       "--", "rm", "train", "--out", str(out), *RM_TINY,
                       env={"MOSLIM_FAULT": "preempt_wait:3", "MOSLIM_FAULT_MARKER": str(fault)})
    (job,) = job_ids(submitted.stdout)
    deadline = time.time() + 120
    while not fault.exists():
        state = slurm.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING"), f"job {state} before step 3:\n{job_output(out)}"
        assert time.time() < deadline, f"step 3 not reached:\n{job_output(out)}"
        time.sleep(0.2)
    fault.unlink()
    slurm.run("scancel", "--signal=USR1", "--batch", job)  # Slurm's own warning-signal path: the batch shell
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 240)
    log = job_output(out)
    assert info["JobState"] == "COMPLETED", log
    assert info["Restarts"] == "1", log  # requeued exactly once, by the batch script
    assert "moslim: requeueing job" in log and "preempted: signal=SIGUSR1 step=3" in log, log
    first = (out / "slurm" / job / "restart_0" / "node0.log").read_text()
    second = (out / "slurm" / job / "restart_1" / "node0.log").read_text()
    assert first.count("exiting with status 75") == 2, first  # both ranks stopped after step 3
    assert second.count("(3 steps done)") == 2, second  # both ranks resumed from step_3
    assert not (out / "PREEMPTED").exists()  # cleared by the requeued run
    _assert_same_run(out, rm_reference)


def test_generated_rendezvous_joins_two_agents(rm_reference, tmp_path):
    """The script's node task (wrapper → torchrun --nnodes=$SLURM_NNODES, c10d on MASTER_ADDR), run
    as two 'nodes' of one rank each on this host: one world of 2, the same run as one agent's."""
    out = tmp_path / "rm"
    sc = SlurmConfig(nodes=2, gpus_per_node=0, nproc_per_node=1, python=sys.executable)
    task = "\n".join(node_task_lines(["rm", "train", "--out", str(out), *RM_TINY], sc))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SLURM_NNODES": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "SLURM_JOB_ID": "rdzv-test"}
    agents = [subprocess.Popen(["bash", "-c", task], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        logs = [a.communicate(timeout=300)[0] for a in agents]
    finally:
        for a in agents:
            if a.poll() is None:
                a.kill()
                a.wait()
    assert [a.returncode for a in agents] == [0, 0], "\n".join(logs)
    assert json.loads((out / "profile.json").read_text())["devices"]["count"] == 2
    _assert_same_run(out, rm_reference)


def _pipeline_recipe(path: Path, out: Path, world: Path, first_command: str) -> Path:
    tiny = [f"{m}.model.{x}" for m in ("sft", "rm") for x in ("hidden_size=32", "intermediate_size=64",
                                                             "num_layers=1", "num_heads=2")]
    common = tiny + ["run.tensorboard=false", "run.num_threads=1", f"run.data_dir={world}",
                     "sft.epochs=1", "sft.batch_size=32", "rm.epochs=1", "rm.batch_size=32", "rm.eval_every=0",
                     "policy.steps=1", "policy.prompts_per_step=2", "policy.samples_per_prompt=2",
                     "policy.mini_batch_size=4", "policy.eval_every=0", "sampling.max_new_tokens=4"]
    recipe = {
        "name": "tiny", "out": str(out),
        "slurm": {"gpus_per_node": 0, "nproc_per_node": 1, "cpus_per_task": 1, "time": "10:00"},
        "stages": [
            {"name": "sft", "command": first_command, "overrides": common},
            {"name": "rm", "command": "rm train", "overrides": common},
            {"name": "policy", "command": "policy train",
             "overrides": common + ["policy.init={sft}/model", "policy.rm_dir={rm}",
                                    f"policy.prompts={world / 'policy_train.jsonl'}"]},
        ],
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    from moslim_mega.config import WorldConfig
    from moslim_mega.prefs import PreferenceSpec
    from moslim_mega.world.build import build_world

    root = tmp_path_factory.mktemp("pipeline_world")
    build_world(WorldConfig(num_sft=64, num_rm_prompts=16, num_rm_eval_prompts=4, num_policy_prompts=20),
                PreferenceSpec.datatype(4), root)
    return root


def test_pipeline_runs_dependent_stages_to_the_end(slurm, tiny_world, tmp_path):
    out = tmp_path / "run"
    recipe = _pipeline_recipe(tmp_path / "recipe.yaml", out, tiny_world, f"sft train --data {tiny_world / 'sft.jsonl'}")
    jobs = job_ids(launch(slurm, "pipeline", "--recipe", str(recipe)).stdout)
    assert len(jobs) == 3
    assert slurm.job(jobs[2])["Dependency"].startswith(f"afterok:{jobs[1]}")
    for job, stage in zip(jobs, ("sft", "rm", "policy")):
        info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300)
        assert info["JobState"] == "COMPLETED", job_output(out / stage)
    assert (out / "sft" / "model").is_dir() and (out / "rm" / "heads.safetensors").is_file()
    assert (out / "policy" / "policy").is_dir()  # trained from the two earlier stages' output dirs


def test_failed_first_stage_cancels_the_rest(slurm, tiny_world, tmp_path):
    out = tmp_path / "run"
    recipe = _pipeline_recipe(tmp_path / "recipe.yaml", out, tiny_world, f"sft train --data {tmp_path / 'missing.jsonl'}")
    jobs = job_ids(launch(slurm, "pipeline", "--recipe", str(recipe)).stdout)
    first = slurm.wait_state(jobs[0], {"COMPLETED", "FAILED", "CANCELLED"}, 120)
    assert first["JobState"] == "FAILED", job_output(out / "sft")
    for job in jobs[1:]:
        info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 60)
        assert info["JobState"] == "CANCELLED", info  # --kill-on-invalid-dep=yes
    assert not (out / "rm" / "metrics.jsonl").exists() and not (out / "policy" / "metrics.jsonl").exists()
