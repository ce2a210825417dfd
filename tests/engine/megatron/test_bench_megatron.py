"""kernels/bench/bench_megatron.py does not rot: its --small path runs both variants on CPU (the
megatron one through the test-only shim) and writes them side by side, starting from the same
mean log-prob; its argument checks refuse bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .cpu_shim import require_pinned

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "kernels" / "bench" / "bench_megatron.py"
SMOKE = """
import sys
sys.path[:0] = [{tests!r}, {bench!r}]
from engine.megatron.cpu_shim import cpu_megatron
import bench_megatron
with cpu_megatron():
    bench_megatron.run(bench_megatron.parse_args(["--small", "--iters", "2", "--warmup", "1", "--out", {out!r}]))
"""


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_PORT": "29583"}


def test_bench_megatron_small_writes_side_by_side_json(tmp_path):
    require_pinned()
    out = tmp_path / "megatron.json"
    code = SMOKE.format(tests=str(ROOT / "tests"), bench=str(SCRIPT.parent), out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert set(res) == {"torch", "megatron"}
    assert all("error" not in r and r["tokens_per_s"] > 0 for r in res.values()), res
    assert res["megatron"]["layer_spec"] == "local" and res["megatron"]["speedup_vs_torch"] > 0
    assert abs(res["megatron"]["first_logp_mean"] - res["torch"]["first_logp_mean"]) < 1e-5, res


@pytest.mark.parametrize("argv, message", [
    (["--small", "--variants", "torch,jax"], "--variants: unknown ['jax']"),
    (["--small", "--iters", "0"], "--iters: must be >= 1"),
    pytest.param([], "refusing to benchmark: no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is the CPU behaviour")),
])
def test_bench_megatron_checks_its_arguments(tmp_path, argv, message):
    out = tmp_path / "x.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv, "--out", str(out)], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def _te_importable() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_te_importable(), reason="the skip is the behaviour without transformer_engine")
def test_bench_megatron_fp8_is_skipped_with_a_line_without_te(tmp_path):
    out = tmp_path / "fp8.json"
    argv = ["--small", "--iters", "1", "--warmup", "0", "--variants", "torch", "--fp8", "tensorwise", "--out", str(out)]
    proc = subprocess.run([sys.executable, str(SCRIPT), *argv], env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "megatron_fp8 skipped: transformer_engine is not importable" in proc.stdout
    record = json.loads(out.read_text())
    assert record["fp8"] == "tensorwise" and "tokens_per_s" in record["results"]["torch"]
    assert record["results"]["megatron_fp8"]["skipped"].startswith("megatron_fp8 skipped")


def test_bench_megatron_refuses_an_unknown_fp8_recipe(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--small", "--fp8", "rowwise", "--out", str(tmp_path / "x.json")],
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--fp8: invalid choice: 'rowwise'" in proc.stderr, proc.stderr[-2000:]
