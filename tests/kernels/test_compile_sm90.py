"""Every kernel variant (fp32 and bf16, every mapping kind) compiles to an sm_90 cubin on CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_all_kernels_compile_for_sm90(tmp_path):
    triton = pytest.importorskip("triton")
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("this triton wheel ships no NVIDIA backend/ptxas")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(tmp_path), "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, str(Path(__file__).parent / "compile_sm90.py")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # 2 dtypes × (2 log-prob + 1 head-loss + 6 reward + 2 head-backward) + the finalize kernel
    assert proc.stdout.count("compiled ") == 2 * 11 + 1, proc.stdout
