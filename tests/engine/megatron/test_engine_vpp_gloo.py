"""Virtual pipeline stages and activation recomputation in the megatron engine: 2 gloo processes,
CPU, fp32, through the test-only CPU shim (cpu_shim.py), with engine_worker.py's comparison
against plain torch (see test_engine_gloo.py).

* pp=2 × vpp=2 on the 4-layer tiny models (each rank holds two chunks of one layer: layers 0 and 2
  on rank 0, 1 and 3 on rank 1; megatron's interleaved 1F1B schedule): forward, one train step
  and ``export_weights`` (per-chunk coordinates) equal torch for the causal-LM (untied and tied
  embeddings), reward and value roles; a step of 1 micro-batch (not a multiple of pp) is refused;
* full recomputation (``activation_checkpointing``) at pp=2 × vpp=2 and at tp=2: equal to torch,
  and the step (metrics and every exported tensor) within 1e-6 of the same step without it, while
  each layer's forward runs twice per micro-batch (once without)."""

from __future__ import annotations

import pytest

from .test_engine_gloo import FORWARD_TOL, GRAD_NORM_RTOL, PARAM_TOL, run_engine_cases

VPP = {"pp": 2, "vpp": 2}
CASES = [
    # The two micro-batches differ in T (10, 7): the interleaved schedule's p2p sends shapes too.
    {"name": "vpp_llama", "arch": "llama", "role": "causal_lm", "layout": VPP, "vary_T": True},
    {"name": "vpp_qwen2_tied", "arch": "qwen2", "role": "causal_lm", "tied": True, "layout": VPP},
    {"name": "vpp_rm_qwen2", "arch": "qwen2", "role": "reward", "layout": VPP, "odd_micro": True},
    {"name": "vpp_value_qwen2", "arch": "qwen2", "role": "value", "layout": VPP},
    {"name": "vpp_recompute_qwen2", "arch": "qwen2", "role": "causal_lm", "layout": VPP, "recompute": True},
    {"name": "recompute_rm_tp2", "arch": "qwen2", "role": "reward", "layout": {"tp": 2}, "recompute": True},
]
NUM_MICRO = 2  # engine_worker.batches


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_engine_cases(CASES, tmp_path_factory.mktemp("megatron_vpp"), timeout=900)


@pytest.mark.parametrize("case", [c["name"] for c in CASES])
def test_megatron_engine_equals_torch(results, case):
    spec = next(c for c in CASES if c["name"] == case)
    for rank in (0, 1):
        res = results[(case, rank)]
        assert res["forward"] < FORWARD_TOL, res
        assert res.get("entropy", 0.0) < FORWARD_TOL, res
        assert res["grad_norm"] < GRAD_NORM_RTOL, res
        assert res["names"] == [], res
        assert res["moved"] > 1e-3 and res["params"] < PARAM_TOL, res
        assert res["after"] < FORWARD_TOL, res
        assert res["layer_forwards"] == NUM_MICRO * (2 if spec.get("recompute") else 1), res
        if spec.get("odd_micro"):
            assert res["odd_micro"] == ("micro_batches: 1 micro-batches; the interleaved schedule (vpp=2) needs a "
                                        "multiple of pp=2 (parallel.pp_microbatches)"), res
        if spec.get("recompute"):
            assert res["recompute_metrics"] < 1e-6 and res["recompute_params"] < 1e-6, res
