"""The session-end process check (tests/proc_guard.py), on a pytest run in a subprocess: a test
that leaks a child, or orphans a grandchild, fails the run, which names and kills them; a test
that waits for its children passes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import psutil

TESTS = Path(__file__).resolve().parent

LEAKY = '''
import subprocess

def test_leaks_a_child():
    subprocess.Popen(["sleep", "291"])  # never waited for

def test_orphans_a_grandchild():
    subprocess.run(["sh", "-c", "sleep 292 &"], check=True)  # sh exits, its sleep lives on
'''

CLEAN = '''
import subprocess

def test_waits_for_its_child():
    subprocess.run(["sleep", "0.1"], check=True)
'''


def _pytest(tmp_path: Path, source: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_inner.py").write_text(source)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "proc_guard", "-p", "no:cacheprovider",
           "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")]
    return subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(TESTS)},
                          capture_output=True, text=True, timeout=120)


def test_leaked_and_orphaned_processes_fail_the_run_and_are_killed(tmp_path):
    out = _pytest(tmp_path, LEAKY)
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "2 passed" in text  # the tests themselves pass: the failure is the check's
    named = dict(re.findall(r"LEFTOVER PROCESS pid (\d+) \(parent \d+\): (sleep 29[12])", text))
    assert sorted(named.values()) == ["sleep 291", "sleep 292"], text
    for pid in map(int, named):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_run_that_waits_for_its_children_passes(tmp_path):
    out = _pytest(tmp_path, CLEAN)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "LEFTOVER" not in out.stdout
