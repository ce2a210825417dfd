"""Exact resume under ``torchrun --nproc_per_node=2`` (gloo, FSDP2 dp=2): the policy loop is
SIGKILLed (the whole torchrun process group) after step 3, restarted with ``resume=auto`` from its
sharded step-2 checkpoint, and must reproduce every metrics row and final weight of an
uninterrupted 2-process run bitwise; the sharded checkpoint then exports to the same HF weights."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from moslim_mega.checkpoint.export import export_hf

from conftest import ROOT, cli_args, metric_rows

pytestmark = pytest.mark.slow

EXTRA = ["policy.algo=rloo", "policy.steps=4", "policy.lr=0.05", "checkpoint.every=2", "parallel.dp=2"]  # step_4 = the final policy


def _torchrun(argv, tmp, env_extra=None, kill_when=None, timeout=300.0):
    """``torchrun -m moslim_mega.cli argv`` on 2 processes; with ``kill_when`` (a marker file)
    SIGKILL the whole process group once it appears, as a node failure would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "moslim_mega.cli", *argv]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + timeout
    try:
        if kill_when is None:
            out, _ = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, out[-6000:]
            return
        while not kill_when.exists():
            if proc.poll() is not None:
                raise AssertionError(f"exited ({proc.returncode}) before the fault point:\n{proc.stdout.read()[-6000:]}")
            if time.time() > deadline:
                raise AssertionError(f"fault point not reached in {timeout} s")
            time.sleep(0.05)
        time.sleep(0.5)  # let the other rank reach the point too (it waits there as well)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_killed_torchrun_policy_resumes_bitwise_and_exports(stage, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _torchrun(cli_args("policy", full, stage, *EXTRA), tmp_path)
    marker = tmp_path / "killed"
    _torchrun(cli_args("policy", resumed, stage, *EXTRA), tmp_path,
              env_extra={"MOSLIM_FAULT": "after_step:3", "MOSLIM_FAULT_MARKER": str(marker)}, kill_when=marker)
    assert (resumed / "ckpt" / "step_2").is_dir() and not (resumed / "policy").exists()
    _torchrun(cli_args("policy", resumed, stage, *EXTRA), tmp_path)  # checkpoint.resume=auto (default)

    assert metric_rows(resumed) == metric_rows(full)
    a, b = (load_file(d / "policy" / "model.safetensors") for d in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The last sharded checkpoint (one file per rank) exports, in one process, to the final weights.
    assert len(list((resumed / "ckpt" / "step_4").glob("*.distcp"))) == 2
    export_hf(resumed / "ckpt", tmp_path / "hf", None)
    c = load_file(tmp_path / "hf" / "model.safetensors")
    assert c.keys() == b.keys() and all(torch.equal(b[k], c[k]) for k in b)
