"""Ranks die with their launcher (``moslim_mega/parallel/dist.py``): torchrun starts each worker in
a session of its own, so SIGKILLing the agent alone (a node agent crashing, a scheduler killing
the wrong pid) must still take the ranks with it instead of leaving them running."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _wait_for_files(paths, proc, timeout):
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        if proc.poll() is not None:
            raise AssertionError(f"exited ({proc.returncode}) before writing {paths}:\n{proc.stdout.read()[-6000:]}")
        if time.time() > deadline:
            raise AssertionError(f"{paths} not written in {timeout} s")
        time.sleep(0.05)
    return [psutil.Process(int(p.read_text())) for p in paths]


def _kill_all(procs):
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def _assert_gone_soon(procs, timeout=5.0):
    """All of ``procs`` exit within ``timeout`` s of the kill (reaped here if re-parented to us)."""
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"still running {timeout} s after their parent died: {[p.pid for p in alive]}"


@pytest.mark.parametrize("nproc", [1, 2])
def test_ranks_die_with_their_sigkilled_torchrun_agent(tmp_path, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(REPO / "tests/parallel/wait_rank.py"), str(tmp_path)]
    agent = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ranks = []
    try:
        ranks = _wait_for_files([tmp_path / f"rank{r}.pid" for r in range(nproc)], agent, timeout=180)
        assert all(r.ppid() == agent.pid for r in ranks)  # really the agent's own workers
        assert all(os.getsid(r.pid) == r.pid for r in ranks)  # each in its own session: killpg misses them
        agent.send_signal(signal.SIGKILL)  # the agent only
        assert agent.wait(timeout=30) == -signal.SIGKILL
        _assert_gone_soon(ranks)
    finally:
        _kill_all([psutil.Process(agent.pid)] if agent.poll() is None else [])
        _kill_all([r for r in ranks if r.is_running()])
        agent.wait()


# The child arms the death signal the way a rank does (Linux), or with the polling thread that
# stands in for it on other platforms, then reports its pid and waits.
ARM = {
    "pdeathsig": "dist.die_with_parent()",
    "poll_thread": "dist._watch_parent(os.getppid(), 0.05)",
}
CHILD = """import os, sys, time
from moslim_mega.parallel import dist
{arm}
open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid())); os.rename(sys.argv[1] + '.tmp', sys.argv[1])
while True:
    time.sleep(0.05)
"""


@pytest.mark.parametrize("mechanism", sorted(ARM))
def test_child_dies_with_its_sigkilled_parent(tmp_path, mechanism):
    if mechanism == "pdeathsig" and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(arm=ARM[mechanism]))
    pid_file = tmp_path / "child.pid"
    # A shell as the parent: it starts the child in the background and waits.
    parent = subprocess.Popen(["sh", "-c", f'"{sys.executable}" "{script}" "{pid_file}" & wait'], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    child = []
    try:
        child = _wait_for_files([pid_file], parent, timeout=120)
        assert child[0].ppid() == parent.pid
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        _assert_gone_soon(child)
    finally:
        _kill_all([psutil.Process(parent.pid)] if parent.poll() is None else [])
        _kill_all([c for c in child if c.is_running()])
        parent.wait()
