"""Runs the Triton kernel code itself on CPU: interp_cases.py in a subprocess with
TRITON_INTERPRET=1 (it must be set before triton is imported, which this process may already
have done)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytest.importorskip("triton")


def test_triton_kernels_match_reference_in_interpreter_mode():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MOSLIM_KERNELS", None)
    cases = str(Path(__file__).parent / "interp_cases.py")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", cases]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "skipped" not in proc.stdout, proc.stdout
