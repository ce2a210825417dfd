"""Exact resume under ``torchrun --nproc_per_node=2`` (gloo, FSDP2 dp=2): the policy loop is
SIGKILLed after step 3 (both ranks and the agent, each by pid: torchrun puts every rank in a session
of its own, so killing the agent's process group would miss them), restarted with ``resume=auto``
from its sharded step-2 checkpoint, and must reproduce every metrics row and final weight of an
uninterrupted 2-process run bitwise; the sharded checkpoint then exports to the same HF weights."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from moslim_mega.checkpoint.export import export_hf

from ckpt_helpers import ROOT, cli_args, metric_rows

pytestmark = pytest.mark.slow

EXTRA = ["policy.algo=rloo", "policy.steps=4", "policy.lr=0.05", "checkpoint.every=2", "parallel.dp=2"]  # step_4 = the final policy


def _torchrun(argv, tmp, env_extra=None, kill_when=None, timeout=300.0):
    """``torchrun -m moslim_mega.cli argv`` on 2 processes; with ``kill_when`` (a marker file)
    SIGKILL every process of the run once it appears, as a node failure would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "moslim_mega.cli", *argv]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        _kill_run(proc)
    finally:
        if proc.poll() is None:
            _kill_tree(psutil.Process(proc.pid))
        proc.wait()


def _kill_run(agent: subprocess.Popen) -> None:
    """SIGKILL both ranks (the agent's children) and then the agent, and check that no process of
    the run survives."""
    tree = psutil.Process(agent.pid).children(recursive=True)
    ranks = [p for p in tree if p.ppid() == agent.pid]
    assert len(ranks) == 2 and all("moslim_mega.cli" in p.cmdline() for p in ranks), [p.cmdline() for p in tree]
    _kill_tree(psutil.Process(agent.pid))
    assert agent.wait(timeout=30) == -signal.SIGKILL
    _, alive = psutil.wait_procs(tree, timeout=30)  # reaped here when re-parented to pytest
    assert not alive, f"survived the kill: {[(p.pid, p.cmdline()) for p in alive]}"
    left = [p for p in psutil.Process().children(recursive=True) if _is_moslim(p)]
    assert not left, f"processes of the run still running: {[(p.pid, p.cmdline()) for p in left]}"


def _kill_tree(root: psutil.Process) -> None:
    """SIGKILL ``root``'s descendants, deepest first, then ``root``."""
    for p in [*reversed(root.children(recursive=True)), root]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _is_moslim(p: psutil.Process) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE and "moslim_mega.cli" in p.cmdline()
    except psutil.NoSuchProcess:
        return False


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
