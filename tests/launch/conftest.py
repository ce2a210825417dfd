"""Fixtures of the launch tests: a real one-host Slurm cluster (session), the tiny RM stage's
command, and running ``moslim launch slurm`` against the cluster."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from slurm_cluster import SlurmCluster, missing_reason

ROOT = Path(__file__).resolve().parents[2]
TINY = ["hidden_size=32", "intermediate_size=64", "num_layers=1", "num_heads=2"]
# The RM stage of tests/checkpoint at one intra-op thread (bitwise comparisons); it builds its
# own tiny world (64 RM examples → 4 steps per epoch, 8 steps).
RM_TINY = [f"rm.model.{x}" for x in TINY] + [
    "run.tensorboard=false", "run.num_threads=1", "rm.epochs=2", "rm.batch_size=16", "rm.eval_every=3",
    "rm.warmup_steps=2", "world.num_rm_prompts=16", "world.num_rm_eval_prompts=4", "world.num_sft=64",
    "world.num_policy_prompts=20",
]
TIMING = {"gen_seconds", "step_seconds", "train_seconds", "wall_seconds"}


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """munged + slurmctld + slurmd on localhost (CPUs=2); stopped, and checked gone, at the end."""
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def launch(cluster: SlurmCluster, *argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``moslim launch slurm ARGV`` for the test cluster: no setup lines, this interpreter."""
    full_env = {**cluster.env, "PYTHONPATH": str(ROOT), **(env or {})}
    cmd = [sys.executable, "-m", "moslim_mega.cli", "launch", "slurm", "--setup", "true", "--python", sys.executable,
           "--gpus-per-node", "0", *argv]
    done = subprocess.run(cmd, env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done


def job_ids(stdout: str) -> list[str]:
    """Job ids from `moslim launch slurm` output ('submitted job N: ...' / 'submitted x: job N')."""
    ids = []
    for line in stdout.splitlines():
        words = line.replace(":", " ").split()
        if words[:1] == ["submitted"]:
            ids.append(words[words.index("job") + 1])
    return ids


def job_output(out: Path) -> str:
    """The batch script's output and every node log of every restart."""
    parts = []
    for f in sorted((out / "slurm").rglob("*")):
        if f.is_file() and f.suffix in (".out", ".log"):
            parts.append(f"===== {f.relative_to(out)}\n{f.read_text(errors='replace')[-4000:]}")
    return "\n".join(parts)


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def rm_weights(run_dir: Path) -> dict:
    """Every tensor of a saved reward model (backbone + heads)."""
    tensors = {}
    for f in sorted(run_dir.glob("**/*.safetensors")):
        if "ckpt" in f.parts:
            continue
        tensors.update({f"{f.relative_to(run_dir)}:{k}": v for k, v in load_file(f).items()})
    assert tensors, f"no safetensors under {run_dir}"
    return tensors


def eval_report(run_dir: Path) -> dict:
    report = json.loads((run_dir / "eval.json").read_text())
    report.pop("train_seconds", None)
    return report
