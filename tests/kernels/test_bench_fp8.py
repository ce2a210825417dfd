"""kernels/bench/bench_fp8.py does not rot: its --small path (tiny Qwen2, emulated fp8, eager) runs
on CPU and writes JSON with bf16 and both fp8 recipes side by side, the fp8 losses tracking bf16's;
without --small and CUDA it refuses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "kernels" / "bench" / "bench_fp8.py"


def _run(*extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *extra], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_bench_fp8_small_writes_side_by_side_json(tmp_path):
    pytest.importorskip("torchao.float8")
    out = tmp_path / "fp8.json"
    proc = _run("--small", "--iters", "2", "--warmup", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["small"] is True and data["emulated_fp8"] is True and data["device"].startswith("cpu")
    res = data["results"]
    assert set(res) == {"bf16_eager", "bf16", "fp8_tensorwise", "fp8_rowwise"}
    assert all("error" not in r and r["tokens_per_s"] > 0 and r["ms"] > 0 for r in res.values()), res
    assert res["bf16"]["float8_linears"] == 0
    assert res["fp8_tensorwise"]["float8_linears"] == res["fp8_rowwise"]["float8_linears"] == 14
    assert res["fp8_rowwise"]["speedup_vs_bf16_compiled"] > 0
    # Same weights and batch: the first step's loss (before any update) agrees to fp8 rounding.
    first = res["bf16"]["losses"][0]
    for name in ("fp8_tensorwise", "fp8_rowwise"):
        assert abs(res[name]["losses"][0] - first) < 0.02 * first, (name, res[name]["losses"], first)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is the CPU behaviour")
def test_bench_fp8_refuses_the_1b_model_on_cpu(tmp_path):
    proc = _run("--out", str(tmp_path / "x.json"))
    assert proc.returncode != 0 and "refusing to benchmark: no CUDA device" in proc.stderr
    assert not (tmp_path / "x.json").exists()
