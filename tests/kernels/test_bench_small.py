"""The benchmark scripts do not rot: their --small path runs on CPU (Triton in interpreter mode)
and writes JSON in which the fused variants agree with eager; without --small and CUDA they refuse."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "kernels" / "bench"


def _run(script, *extra, interpret=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, str(BENCH / script), *extra]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script", ["bench_linear_logprob.py", "bench_multihead_head.py"])
def test_bench_small_writes_json_with_agreeing_fused_variant(script, tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "b.json"
    proc = _run(script, "--small", "--iters", "1", "--warmup", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["small"] is True and data["device"].startswith("cpu") and data["date_utc"]
    (shape,) = data["shapes"]
    if data["bench"] == "linear_logprob":
        fused = shape["results"]["fused_triton"]
        assert fused["ms"] > 0 and fused["max_abs_diff_logp_vs_eager"] < 1e-4
        assert shape["summary"]["fused_eff_tflops"] == fused["eff_tflops"] > 0
    else:
        assert shape["train"]["fused_triton"]["max_abs_diff_per_head_loss_vs_eager"] < 1e-4
        assert shape["inference"]["fused_triton"]["max_abs_diff_reward_vs_eager"] < 1e-4
        assert shape["summary"]["train_fwd_bwd_speedup_vs_eager"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is the CPU behaviour")
def test_bench_refuses_full_shapes_on_cpu(tmp_path):
    proc = _run("bench_linear_logprob.py", "--out", str(tmp_path / "x.json"), interpret=False)
    assert proc.returncode != 0 and "refusing to benchmark: no CUDA device" in proc.stderr
    assert not (tmp_path / "x.json").exists()
