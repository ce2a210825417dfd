"""pytest plugin: no test leaves a process behind.

At session start the pytest process becomes a child subreaper (Linux), so a process orphaned by
a test (e.g. a torchrun rank whose agent was killed) is re-parented to pytest instead of pid 1
and stays findable. At session end every still-running descendant is named (pid + command line),
SIGKILLed and reaped, and the run fails. Loaded by tests/conftest.py; ``-p proc_guard`` loads it
into any other pytest run (tests/test_proc_guard.py does).
"""

from __future__ import annotations

import ctypes
import os
import sys

import psutil
import pytest

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
_LEFTOVERS = pytest.StashKey[list]()


def pytest_configure(config):
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(err)}")


def _interpreter_helpers() -> set[int]:
    """Pids of multiprocessing's own helper servers (resource tracker, forkserver): they belong
    to this interpreter, not to a test, and exit with it when their pipe closes."""
    pids = set()
    for name in ("multiprocessing", "multiprocess"):
        tracker = sys.modules.get(f"{name}.resource_tracker")
        forkserver = sys.modules.get(f"{name}.forkserver")
        pids.add(getattr(getattr(tracker, "_resource_tracker", None), "_pid", None))
        pids.add(getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None))
    pids.discard(None)
    return pids


def _describe(proc: psutil.Process, width: int = 400) -> str:
    try:
        cmd = " ".join(proc.cmdline()) or proc.name()
        return f"pid {proc.pid} (parent {proc.ppid()}): {cmd[:width]}{' ...' if len(cmd) > width else ''}"
    except psutil.Error:
        return f"pid {proc.pid}: <exited>"


def find_leftovers() -> list[psutil.Process]:
    """Running (not zombie) descendants of this process, less the interpreter's own helpers."""
    helpers = _interpreter_helpers()
    alive = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.pid not in helpers and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            pass
    return alive


def kill_and_reap(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)  # reaps those that are (now) our children


def _reap_zombie_children() -> None:
    """Orphans re-parented to us that already exited are zombies until waited for."""
    for proc in psutil.Process().children():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(proc.pid, os.WNOHANG)
        except (psutil.NoSuchProcess, ChildProcessError):
            pass


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    leftovers = find_leftovers()
    session.config.stash[_LEFTOVERS] = [_describe(p) for p in leftovers]
    if leftovers:
        kill_and_reap(leftovers)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    _reap_zombie_children()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    described = config.stash.get(_LEFTOVERS, [])
    if described:
        terminalreporter.section("processes left running by the tests", sep="=", red=True, bold=True)
        for line in described:
            terminalreporter.line(f"LEFTOVER PROCESS {line} (killed)", red=True)
        terminalreporter.line(f"{len(described)} process(es) outlived the test session: failing the run", red=True)
