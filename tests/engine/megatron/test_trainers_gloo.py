"""``moslim sft train`` / ``moslim rm train`` with ``parallel.backend=megatron`` equal the torch
backend's single-process run: 2 gloo processes on CPU (fp32) through the real CLI entry point,
inside the test-only CPU shim (run_cli_shim.py; no product code imports it).

* SFT at dp=2, tp=2 and pp=2, the RM at tp=2 and pp=2: every exported tensor (the final HF / RM
  directory, written from ``engine.export_weights()``) and every metrics row (loss, gradient norm,
  lr; the RM's evaluations through the engine's forward) within 1e-5;
* ``moslim policy train`` (RLOO, Online-DPO; greedy PPO with its critic, a second megatron engine)
  with the actor in the megatron engine at tp=2 (PPO also at dp=2): the final policy and every row within 1e-5
  (sampled rollouts: the tp ranks share one dp shard);
* resume through megatron's ``dist_checkpointing`` (``ckpt/step_N/engine/<name>``): an SFT run
  at pp=2 SIGKILLed after step 3 and restarted (``checkpoint.resume=auto``) from its step-2
  checkpoint, an RM run at tp=2 and a PPO run started from another run's checkpoint, end with the
  uninterrupted run's weights and rows bit for bit; a checkpoint of another tp/pp layout is
  refused naming both layouts; ``moslim export hf`` of the last checkpoints (one process, megatron's
  loader) gives the trainers' final weights bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .cpu_shim import require_pinned

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
WRAPPER = Path(__file__).with_name("run_cli_shim.py")
TINY = ["hidden_size=32", "intermediate_size=64", "num_heads=4", "num_layers=2"]
BASE = ["run.tensorboard=false", "run.num_threads=1"]
# 32 SFT pairs in batches of 8, 4 × 4 RM pairs in batches of 16: 4 steps each.
SFT = [f"sft.model.{x}" for x in TINY] + ["sft.batch_size=8", "sft.epochs=1", "sft.warmup_steps=2", "sft.lr=0.01"]
RM = [f"rm.model.{x}" for x in TINY] + ["rm.batch_size=16", "rm.epochs=1", "rm.eval_every=2", "rm.warmup_steps=2"]
POLICY = ["policy.steps=2", "policy.prompts_per_step=4", "policy.samples_per_prompt=2", "policy.mini_batch_size=8",
          "sampling.max_new_tokens=5"]
MG = ["parallel.backend=megatron"]
EVERY2 = ["checkpoint.every=2"]
TIMING = {"gen_seconds", "step_seconds", "train_seconds", "wall_seconds"}
FILES = {"sft": ["model/model.safetensors"], "rm": ["backbone/model.safetensors", "heads.safetensors"],
         "policy": ["policy/model.safetensors"]}
# fp32 on CPU: different reduction orders (TP shards, per-stage matmuls) only; measured ≤ 4.1e-6
# on the weights (moving ~1e-2) and ≤ 4.6e-6 on a row (an RM gradient norm of 44).
TOL = 1e-5


def _launch(jobs: list[list[str]], tmp: Path, tag: str, env_extra: dict | None = None, kill_when: Path | None = None):
    """torchrun (2 processes) of the wrapper over ``jobs``; with ``kill_when`` SIGKILL the whole run
    (agent and ranks: one process group) once that marker file appears."""
    (tmp / f"{tag}.json").write_text(json.dumps(jobs))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WRAPPER),
           str(tmp / f"{tag}.json")]
    log = open(tmp / f"{tag}.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    try:
        while proc.poll() is None and time.time() < deadline:
            if kill_when is not None and kill_when.exists():
                time.sleep(0.5)  # both ranks wait at the fault point
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                _wait_gone(proc.pid)
                return
            time.sleep(0.1)
        assert proc.poll() is not None, f"{tag}: not done in 600 s"
        assert kill_when is None, f"{tag}: exited ({proc.returncode}) before the fault point"
        assert proc.returncode == 0, (tmp / f"{tag}.log").read_text()[-6000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _wait_gone(pgid: int) -> None:
    """Until no process of the killed run's group is left (the ranks are reaped by init)."""
    for _ in range(300):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of group {pgid} survived SIGKILL")


def _sft(tmp: Path, name: str, *extra: str) -> list[str]:
    return ["sft", "train", "--data", str(tmp / "data" / "sft.jsonl"), "--out", str(tmp / name),
            f"run.data_dir={tmp / 'data'}", *BASE, *SFT, *extra]


def _rm(tmp: Path, name: str, *extra: str) -> list[str]:
    return ["rm", "train", "--out", str(tmp / name), f"run.data_dir={tmp / 'data'}", *BASE, *RM, *extra]


def _policy(tmp: Path, name: str, algo: str, *extra: str) -> list[str]:
    """From the torch-backend SFT model and RM of this module (the same start for both backends);
    PPO greedy, as tests/parallel/test_torchrun_stages.py runs it."""
    greedy = ["sampling.temperature=0", "policy.whiten_advantages=false"] if algo == "ppo" else []
    return ["policy", "train", "--out", str(tmp / name), f"run.data_dir={tmp / 'data'}", *BASE, *POLICY, *greedy,
            f"policy.algo={algo}", f"policy.init={tmp / 'sft_torch' / 'model'}", f"policy.rm_dir={tmp / 'rm_torch'}",
            f"policy.prompts={tmp / 'data' / 'policy_train.jsonl'}", *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    require_pinned()
    from moslim_mega.config import load_config
    from moslim_mega.policy.controller import train_policy
    from moslim_mega.prefs import spec_from_config
    from moslim_mega.reward.trainer import train_reward_model
    from moslim_mega.sft import train_sft
    from moslim_mega.world.build import build_world

    tmp = tmp_path_factory.mktemp("megatron_trainers")
    world = load_config(None, ["world.num_sft=32", "world.num_rm_prompts=16", "world.num_rm_eval_prompts=4",
                               "world.num_policy_prompts=4"]).world
    paths = build_world(world, spec_from_config(load_config(None, []).prefs), tmp / "data")
    threads = torch.get_num_threads()
    try:  # the torch backend, one process, in this process
        train_sft(load_config(None, _sft(tmp, "sft_torch")[6:]), paths["sft"], tmp / "sft_torch", show_progress=False)
        train_reward_model(load_config(None, _rm(tmp, "rm_torch")[4:]), tmp / "rm_torch", show_progress=False)
        for algo in ("rloo", "online_dpo", "ppo"):
            c = load_config(None, _policy(tmp, f"{algo}_torch", algo)[4:])
            train_policy(c, tmp / f"{algo}_torch", c.policy.init, c.policy.rm_dir, c.policy.prompts, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    _launch([
        _sft(tmp, "sft_dp2", *MG),  # tp = pp = 1: megatron's data parallelism (its DDP averages over dp)
        _sft(tmp, "sft_tp2", *MG, "parallel.tp=2"),
        _sft(tmp, "sft_pp2", *MG, "parallel.pp=2", *EVERY2),
        _rm(tmp, "rm_tp2", *MG, "parallel.tp=2", *EVERY2),
        _rm(tmp, "rm_pp2", *MG, "parallel.pp=2"),
        # Another run started from rm_tp2's step-2 checkpoint (its steps 3-4 and evaluations only).
        _rm(tmp, "rm_tp2_from2", *MG, "parallel.tp=2", f"checkpoint.resume={tmp / 'rm_tp2' / 'ckpt' / 'step_2'}"),
        # The policy loop: the actor in the megatron engine, sampled rollouts (tp ranks share one
        # dp shard, so the sampler sees the single process's seed and weights).
        _policy(tmp, "rloo_tp2", "rloo", *MG, "parallel.tp=2"),
        _policy(tmp, "online_dpo_tp2", "online_dpo", *MG, "parallel.tp=2"),
        # PPO: the critic is a second megatron engine (role value); both are checkpointed.
        _policy(tmp, "ppo_tp2", "ppo", *MG, "parallel.tp=2", "checkpoint.every=1"),
        _policy(tmp, "ppo_dp2", "ppo", *MG),  # greedy: each dp rank's responses are the single process's
        _policy(tmp, "ppo_tp2_from1", "ppo", *MG, "parallel.tp=2",
                f"checkpoint.resume={tmp / 'ppo_tp2' / 'ckpt' / 'step_1'}"),
        # sft_pp2's checkpoint under another layout: refused (the CLI's status 2 and one line).
        {"argv": _sft(tmp, "sft_relayout", *MG, "parallel.tp=2", f"checkpoint.resume={tmp / 'sft_pp2' / 'ckpt'}"),
         "rc": 2},
    ], tmp, "main")
    marker = tmp / "killed"
    killed = _sft(tmp, "sft_pp2_killed", *MG, "parallel.pp=2", *EVERY2)
    _launch([killed], tmp, "kill", {"MOSLIM_FAULT": "after_step:3", "MOSLIM_FAULT_MARKER": str(marker)}, marker)
    assert (tmp / "sft_pp2_killed" / "ckpt" / "step_2").is_dir() and not (tmp / "sft_pp2_killed" / "model").exists()
    _launch([killed], tmp, "resume")  # checkpoint.resume=auto (the default)
    return tmp


def _weights(run: Path, kind: str) -> dict:
    return {f"{f}:{k}": v for f in FILES[kind] for k, v in load_file(run / f).items()}


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _row_diff(a: list[dict], b: list[dict]) -> float:
    """Max abs difference of the numbers of two row lists with the same keys (relative for the
    gradient norm); anything else must be equal."""
    assert len(a) == len(b) and len(a) > 1
    worst = 0.0
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), (x, y)
        for k in x:
            if isinstance(x[k], float):
                worst = max(worst, abs(x[k] - y[k]) / (max(1.0, abs(x[k])) if "grad_norm" in k else 1.0))
            else:
                assert x[k] == y[k], (k, x[k], y[k])
    return worst


@pytest.mark.parametrize("kind, run", [("sft", "sft_dp2"), ("sft", "sft_tp2"), ("sft", "sft_pp2"), ("rm", "rm_tp2"),
                                       ("rm", "rm_pp2")])
def test_megatron_backend_equals_the_torch_backend(runs, kind, run):
    ref, got = _weights(runs / f"{kind}_torch", kind), _weights(runs / run, kind)
    assert ref.keys() == got.keys()
    moved = max(float((ref[k] - load_init(runs / run, kind)[k]).abs().max()) for k in ref)
    assert moved > 1e-3  # training changed the weights
    assert max(float((ref[k] - got[k]).abs().max()) for k in ref) < TOL
    assert _row_diff(_rows(runs / f"{kind}_torch"), _rows(runs / run)) < TOL
    if kind == "rm":
        s1, s2 = (json.loads((runs / r / "mapping_stats.json").read_text()) for r in (f"{kind}_torch", run))
        assert s1.keys() == s2.keys()


def load_init(run: Path, kind: str) -> dict:
    """The starting weights the megatron engine loaded (``megatron_init/``), under FILES' names."""
    init = run / "megatron_init"
    if kind == "sft":
        return {f"model/model.safetensors:{k}": v for k, v in load_file(init / "model.safetensors").items()}
    return {**{f"backbone/model.safetensors:{k}": v for k, v in load_file(init / "backbone/model.safetensors").items()},
            **{f"heads.safetensors:{k}": v for k, v in load_file(init / "heads.safetensors").items()}}


def test_killed_pp2_sft_run_resumes_exactly(runs):
    full, resumed = runs / "sft_pp2", runs / "sft_pp2_killed"
    a, b = _weights(full, "sft"), _weights(resumed, "sft")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(resumed) == _rows(full)
    # The engine's own format: megatron's dist_checkpointing beside the trainer's (empty) DCP state.
    engine_dir = resumed / "ckpt" / "step_4" / "engine" / "model"
    assert (engine_dir / "metadata.json").is_file() and len(list(engine_dir.glob("*.distcp"))) == 4
    assert json.loads((engine_dir / "moslim_layout.json").read_text())["pp"] == 2


def test_rm_run_from_another_runs_checkpoint_ends_where_it_does(runs):
    full, other = runs / "rm_tp2", runs / "rm_tp2_from2"
    a, b = _weights(full, "rm"), _weights(other, "rm")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # From another run's checkpoint the rows are appended: this run wrote steps 2..4 only.
    rows_full, rows_other = _rows(full), _rows(other)
    assert rows_other == [r for r in rows_full if r["step"] >= 2]
    assert json.loads((other / "mapping_stats.json").read_text()) == json.loads((full / "mapping_stats.json").read_text())


def test_resume_under_another_layout_is_refused(runs):
    log = (runs / "main.log").read_text()
    assert "moslim: error: " in log and "written under the megatron layout {'tp': 1, 'pp': 2" in log
    assert "this run has {'tp': 2, 'pp': 1" in log


@pytest.mark.parametrize("kind, ckpt, final", [("sft", "sft_pp2_killed/ckpt", "sft_pp2_killed"),
                                               ("rm", "rm_tp2/ckpt/step_4", "rm_tp2")])
def test_export_hf_of_a_megatron_checkpoint_gives_the_final_weights(runs, tmp_path, kind, ckpt, final):
    from moslim_mega.checkpoint.export import export_hf

    export_hf(runs / ckpt, tmp_path / "hf")
    files = [f.removeprefix("model/") for f in FILES[kind]]
    a = _weights(runs / final, kind)
    b = {f"{f}:{k}": v for f, g in zip(FILES[kind], files) for k, v in load_file(tmp_path / "hf" / g).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("algo, layout", [("rloo", "tp2"), ("online_dpo", "tp2"), ("ppo", "tp2"), ("ppo", "dp2")])
def test_policy_loop_with_the_megatron_actor_equals_the_torch_backend(runs, algo, layout):
    ref, got = _weights(runs / f"{algo}_torch", "policy"), _weights(runs / f"{algo}_{layout}", "policy")
    init = {f"policy/model.safetensors:{k}": v for k, v in load_file(runs / "sft_torch" / "model" / "model.safetensors").items()}
    assert ref.keys() == got.keys() == init.keys()
    assert max(float((ref[k] - init[k]).abs().max()) for k in ref) > 1e-5  # training moved the policy
    assert max(float((ref[k] - got[k]).abs().max()) for k in ref) < TOL
    assert _row_diff(_rows(runs / f"{algo}_torch"), _rows(runs / f"{algo}_{layout}")) < TOL


def test_ppo_run_from_another_runs_checkpoint_ends_where_it_does(runs):
    a, b = _weights(runs / "ppo_tp2", "policy"), _weights(runs / "ppo_tp2_from1", "policy")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The actor's and the critic's engine directories, and rows (value loss included) bit for bit.
    assert sorted(p.name for p in (runs / "ppo_tp2" / "ckpt" / "step_1" / "engine").iterdir()) == ["actor", "critic"]
    assert _rows(runs / "ppo_tp2_from1") == [r for r in _rows(runs / "ppo_tp2") if r["step"] >= 1]
