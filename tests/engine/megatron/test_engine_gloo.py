"""The megatron engine equals plain torch on the same weights: 2 gloo processes, CPU, fp32.

Through the test-only CPU shim (cpu_shim.py, pinned to megatron-core 0.16.1) megatron's own
GPTModel, DDP, optimizer and pipeline schedule run on CPU; engine_worker.py compares, per case,
the forward head output with the HF model's (log-probs and entropies, RM probabilities, or the
critic's values) and one train step (an RLOO-style PPO actor step, an RM cross-entropy step, or a
value-loss step) with the same loss,
backward, clip and AdamW in plain torch (utils/optim.Updater): gradient norm, every exported HF
tensor after the step, and the head output after the step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .cpu_shim import require_pinned

ROOT = Path(__file__).resolve().parents[3]

CASES = [
    {"name": "qwen2_tp1_dp2", "arch": "qwen2", "role": "causal_lm", "layout": {}, "nonfinite": True},
    {"name": "llama_tp1_dp2", "arch": "llama", "role": "causal_lm", "layout": {}},
    {"name": "qwen2_tp2", "arch": "qwen2", "role": "causal_lm", "layout": {"tp": 2}},
    {"name": "llama_tp2", "arch": "llama", "role": "causal_lm", "layout": {"tp": 2}, "from_pretrained": True},
    {"name": "qwen2_tied_tp2", "arch": "qwen2", "role": "causal_lm", "tied": True, "layout": {"tp": 2}},
    # The two micro-batches differ in T (10, 7): megatron's p2p sends the shapes first.
    {"name": "llama_pp2", "arch": "llama", "role": "causal_lm", "layout": {"pp": 2}, "vary_T": True},
    {"name": "qwen2_tied_pp2", "arch": "qwen2", "role": "causal_lm", "tied": True, "layout": {"pp": 2}},
    {"name": "rm_qwen2_tp2", "arch": "qwen2", "role": "reward", "layout": {"tp": 2}},
    {"name": "rm_qwen2_pp2", "arch": "qwen2", "role": "reward", "layout": {"pp": 2}, "from_pretrained": True},
    {"name": "value_qwen2_tp2", "arch": "qwen2", "role": "value", "layout": {"tp": 2}},
    {"name": "moe_ep2", "arch": "qwen2_moe", "role": "causal_lm", "layout": {"ep": 2}},
]
FORWARD_TOL = 1e-5  # fp32 log-probs / probabilities: measured ≤ 1e-6
GRAD_NORM_RTOL = 1e-5
# Parameters after one AdamW step at lr 1e-2 move by ~6e-3; Adam's m/(√v + ε) turns the last-bit
# differences of near-zero gradients into update differences up to 2.5e-5 (measured: one row of a
# tied embedding; ≤ 3e-6 elsewhere), so 5e-5.
PARAM_TOL = 5e-5


def run_engine_cases(cases: list[dict], out: Path, timeout: int) -> dict:
    """engine_worker.py over ``cases`` on 2 gloo processes: {(case name, rank): its result row}."""
    require_pinned()
    (out / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "engine_worker.py"), str(out / "cases.json")]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return {(c["name"], r): json.loads((out / f"result_{c['name']}_rank{r}.json").read_text())
            for c in cases for r in (0, 1)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_engine_cases(CASES, tmp_path_factory.mktemp("megatron_engine"), timeout=1200)


@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_megatron_engine_equals_torch(results, case):
    for rank in (0, 1):
        res = results[(case, rank)]
        assert res["forward"] < FORWARD_TOL, res
        assert res.get("entropy", 0.0) < FORWARD_TOL, res
        assert res["grad_norm"] < GRAD_NORM_RTOL, res
        assert res["lr"] < 1e-12, res  # the next step's lr, as utils/optim.Updater reports it
        assert res["names"] == [], res  # export_weights gives exactly the HF model's tensor names
        assert res["moved"] > 1e-3 and res["params"] < PARAM_TOL, res
        assert res["after"] < FORWARD_TOL, res


def test_non_finite_gradient_raises_before_the_update(results):
    for rank in (0, 1):
        res = results[("qwen2_tp1_dp2", rank)]
        assert res["nonfinite"] == "step 7: gradient norm is not finite", res
        assert res["params_after_nonfinite"] == 0.0, res
