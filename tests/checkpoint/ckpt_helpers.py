"""Helpers of the checkpoint tests (a module with a unique name: several test folders have a
conftest.py, and `from conftest import ...` picks whichever was imported first)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny_stage import build_tiny_stage

ROOT = Path(__file__).resolve().parents[2]
TINY = ["hidden_size=32", "intermediate_size=64", "num_layers=1", "num_heads=2"]
# One intra-op thread everywhere (this process and the CLI subprocesses): bitwise equality of
# float reductions needs the same thread partitioning in both runs.
SMALL = [f"sft.model.{x}" for x in TINY] + [f"rm.model.{x}" for x in TINY] + [
    "run.tensorboard=false", "run.num_threads=1",
    "sft.epochs=2", "sft.batch_size=16", "sft.warmup_steps=2", "sft.lr=0.01",
    "rm.epochs=2", "rm.batch_size=16", "rm.eval_every=3", "rm.warmup_steps=2",
    "policy.steps=5", "policy.prompts_per_step=4", "policy.samples_per_prompt=2",
    "policy.mini_batch_size=4", "policy.micro_batch_size=2", "policy.eval_every=0",
    "policy.adaptive_kl=true", "sampling.max_new_tokens=6",
]
TIMING = {"gen_seconds", "step_seconds", "train_seconds", "wall_seconds"}


def cli_args(kind: str, out: Path, stage: dict, *extra: str) -> list[str]:
    """argv of ``moslim <kind> train`` for the stage."""
    head = {"sft": ["sft", "train", "--data", str(stage["sft_data"])], "rm": ["rm", "train"],
            "policy": ["policy", "train"]}[kind]
    return head + ["--out", str(out)] + stage["overrides"] + list(extra)


def run_cli_until_killed(argv: list[str], fault: str, marker: Path, timeout: float = 120.0) -> None:
    """Run ``python -m moslim_mega.cli argv`` with MOSLIM_FAULT=fault; SIGKILL it once it reaches
    the point (the marker file appears). Fails if it exits on its own first."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOSLIM_FAULT": fault, "MOSLIM_FAULT_MARKER": str(marker)}
    proc = subprocess.Popen([sys.executable, "-m", "moslim_mega.cli", *argv], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"exited ({proc.returncode}) before {fault}:\n{proc.stdout.read()[-3000:]}")
            if time.time() > deadline:
                raise AssertionError(f"{fault} not reached in {timeout} s")
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def metric_rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl rows without wall-clock timings (the only fields that may differ)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]
