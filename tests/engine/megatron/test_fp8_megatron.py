"""``parallel.fp8`` under ``parallel.backend=megatron``: Transformer Engine FP8 recipes.

On CPU (no TE here): the translation into megatron-core's ``TransformerConfig`` field by field for
each recipe (built, so megatron's own ``__post_init__`` checks run), the load-time refusals of the
other backend's recipes, the engine's refusals (no TE, MoE, dims, no CUDA, MXFP8 below Blackwell)
and ``build_megatron_engine`` handing the recipe to the engine. The FP8 training step itself is
tests/engine/megatron/test_engine_gpu.py (CUDA + transformer_engine)."""

import pytest
import torch

from moslim_mega.config import ConfigError, ParallelConfig, load_config
from moslim_mega.engine.megatron import engine as engine_mod
from moslim_mega.engine.megatron.config import FP8_RECIPES, fp8_fields, transformer_config_kwargs
from moslim_mega.engine.megatron.dims import Layout, LayoutError, check_fp8_dims, model_dims
from moslim_mega.engine.megatron.engine import EngineSettings, MegatronEngine, MegatronEngineError

from .tiny_hf import hf_config

# Qwen2-shaped with every FP8 GEMM dim a multiple of 32 (the tiny_hf models have
# intermediate_size=24, which TE's FP8 refuses).
FP8_SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64)


def _qwen2_fp8(**changes) -> dict:
    from transformers import Qwen2Config

    return Qwen2Config(**{**FP8_SHAPE, **changes}).to_dict()


# ---- config: which backend offers which recipe -------------------------------------------

@pytest.mark.parametrize("backend, fp8", [("torch", "none"), ("torch", "tensorwise"), ("torch", "rowwise"),
                                          ("megatron", "none"), ("megatron", "tensorwise"), ("megatron", "delayed"),
                                          ("megatron", "blockwise"), ("megatron", "mxfp8")])
def test_each_backend_loads_its_recipes(backend, fp8):
    cfg = load_config(None, [f"parallel.backend={backend}", f"parallel.fp8={fp8}"])
    assert (cfg.parallel.backend, cfg.parallel.fp8) == (backend, fp8)


@pytest.mark.parametrize("backend, fp8, message", [
    ("torch", "delayed", "parallel.fp8=delayed: a Transformer Engine recipe of parallel.backend=megatron; "
                         "parallel.backend=torch (torchao) offers tensorwise, rowwise"),
    ("torch", "mxfp8", "parallel.fp8=mxfp8: a Transformer Engine recipe"),
    ("torch", "blockwise", "parallel.fp8=blockwise: a Transformer Engine recipe"),
    ("megatron", "rowwise", "parallel.fp8=rowwise: torchao's recipe of parallel.backend=torch; "
                            "parallel.backend=megatron (Transformer Engine) offers tensorwise, delayed, blockwise, mxfp8"),
])
def test_the_other_backends_recipes_are_refused_at_load_time(backend, fp8, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [f"parallel.backend={backend}", f"parallel.fp8={fp8}"])
    with pytest.raises(ConfigError, match="parallel.fp8"):
        ParallelConfig(backend=backend, fp8=fp8)


def test_unknown_recipe_names_the_choices():
    with pytest.raises(ConfigError, match="parallel.fp8: 'e4m3' is not one of none, tensorwise, rowwise, delayed"):
        load_config(None, ["parallel.fp8=e4m3"])


# ---- translation into TransformerConfig --------------------------------------------------

@pytest.mark.parametrize("recipe", FP8_RECIPES)
def test_fp8_fields_reach_a_transformer_config_megatron_accepts(recipe):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")
    from moslim_mega.engine.megatron.config import transformer_config

    delayed = recipe == "delayed"
    want = {"fp8": "hybrid", "fp8_recipe": recipe, "fp8_margin": 0, "fp8_param": False,
            "fp8_amax_history_len": 1024 if delayed else 1, "fp8_amax_compute_algo": "max" if delayed else "most_recent"}
    assert fp8_fields(recipe) == want
    hf = {**_qwen2_fp8(), "dtype": "bfloat16"}
    # As the engine builds it: bf16, with full recomputation (TransformerConfig checks fp8 × recompute).
    cfg = transformer_config(hf, Layout(tp=2), fp8=recipe, recompute_granularity="full",
                             recompute_method="uniform", recompute_num_layers=1)
    assert {k: getattr(cfg, k) for k in want} == want
    assert cfg.bf16 is True and cfg.fp8_wgrad is True  # weight gradients in FP8 too (TE's default)
    assert cfg.first_last_layers_bf16 is False and cfg.fp8_dot_product_attention is False


def test_no_fp8_leaves_megatrons_defaults():
    assert fp8_fields("none") == {}
    kw = transformer_config_kwargs(_qwen2_fp8())
    assert not any(k.startswith("fp8") for k in kw)
    with pytest.raises(ValueError, match="parallel.fp8='rowwise': the megatron backend offers tensorwise"):
        fp8_fields("rowwise")


@pytest.mark.parametrize("config, layout, recipe, message", [
    # tiny_hf's models: intermediate_size=24.
    (hf_config("qwen2").to_dict(), Layout(), "tensorwise", r"intermediate_size / tp = 24 \(from 24\) is not a multiple of 16"),
    ({**_qwen2_fp8(), "hidden_size": 72, "head_dim": 16}, Layout(), "delayed",
     r"hidden_size = 72 \(from 72\) is not a multiple of 16"),
    # q 3 heads + k, v 1 head each, of 8: TE's fused linear_qkv has 40 output rows.
    ({**_qwen2_fp8(), "head_dim": 8, "num_attention_heads": 3, "num_key_value_heads": 1}, Layout(), "tensorwise",
     r"head_dim × \(num_attention_heads \+ 2 × num_key_value_heads\) / tp = 40 \(from 40\)"),
    (_qwen2_fp8(), Layout(tp=2), "tensorwise", None),  # 128 / 2 = 64 per rank
    (_qwen2_fp8(intermediate_size=48), Layout(tp=2), "tensorwise", r"intermediate_size / tp = 24 \(from 48\)"),
    # MXFP8's 32: 48 is fine for tensorwise, not for mxfp8.
    (_qwen2_fp8(intermediate_size=48), Layout(), "tensorwise", None),
    (_qwen2_fp8(intermediate_size=48), Layout(), "mxfp8", r"intermediate_size / tp = 48 \(from 48\) is not a multiple of 32"),
])
def test_fp8_dims_rule_names_the_size(config, layout, recipe, message):
    dims = model_dims(config, tp=layout.tp)
    if message is None:
        check_fp8_dims(dims, layout, recipe)
        transformer_config_kwargs(config, layout, fp8=recipe)
        return
    with pytest.raises(LayoutError, match=f"parallel.fp8={recipe}: {message}"):
        transformer_config_kwargs(config, layout, fp8=recipe)


# ---- the engine's refusals, before anything is built -------------------------------------

def _refused(config, settings, message, role="causal_lm", layout=Layout()):
    with pytest.raises((MegatronEngineError, LayoutError), match=message):
        MegatronEngine(config, lambda name: None, role, layout, settings)


def test_engine_refuses_fp8_without_transformer_engine(monkeypatch):
    monkeypatch.setattr(engine_mod, "te_available", lambda: False)
    _refused(_qwen2_fp8(), EngineSettings(lr=1e-3, fp8="tensorwise"),
             "parallel.fp8=tensorwise: FP8 in megatron-core needs Transformer Engine")
    # The local spec asked for explicitly, TE installed or not: its linears have no FP8 GEMMs.
    monkeypatch.setattr(engine_mod, "te_available", lambda: True)
    _refused(_qwen2_fp8(), EngineSettings(lr=1e-3, fp8="delayed", use_te=False),
             "parallel.fp8=delayed: FP8 in megatron-core needs Transformer Engine")


def test_engine_refuses_an_unknown_recipe_moe_and_dims(monkeypatch):
    monkeypatch.setattr(engine_mod, "te_available", lambda: True)
    _refused(_qwen2_fp8(), EngineSettings(lr=1e-3, fp8="rowwise"), "parallel.fp8=rowwise: the megatron backend")
    _refused(hf_config("qwen2_moe").to_dict(), EngineSettings(lr=1e-3, fp8="tensorwise"),
             "parallel.fp8=tensorwise: FP8 of a Qwen2-MoE model is not in the megatron engine")
    _refused(hf_config("qwen2").to_dict(), EngineSettings(lr=1e-3, fp8="tensorwise"),
             "parallel.fp8=tensorwise: intermediate_size / tp = 24")


def _gpu(monkeypatch, cap, name="NVIDIA H200"):
    monkeypatch.setattr(engine_mod, "te_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name)


def test_engine_refuses_fp8_without_cuda(monkeypatch):
    monkeypatch.setattr(engine_mod, "te_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(_qwen2_fp8(), EngineSettings(lr=1e-3, fp8="tensorwise"),
             "parallel.fp8=tensorwise: Transformer Engine's FP8 runs on CUDA GPUs only")


def test_engine_refuses_mxfp8_below_blackwell_and_fp8_below_ada(monkeypatch):
    _gpu(monkeypatch, (9, 0))
    _refused(_qwen2_fp8(), EngineSettings(lr=1e-3, fp8="mxfp8"),
             r"parallel.fp8=mxfp8: MXFP8 needs Blackwell \(compute capability ≥ 10.0\); NVIDIA H200 is sm90 — "
             "use parallel.fp8=tensorwise or delayed")
    # Past the FP8 checks on an H200, the next refusal is the missing process group.
    _refused(_qwen2_fp8(), EngineSettings(lr=1e-3, fp8="tensorwise"), "torch.distributed is not initialised")
    _gpu(monkeypatch, (10, 0), "NVIDIA B200")
    _refused(_qwen2_fp8(), EngineSettings(lr=1e-3, fp8="mxfp8"), "torch.distributed is not initialised")
    _gpu(monkeypatch, (8, 0), "NVIDIA A100")
    _refused(_qwen2_fp8(), EngineSettings(lr=1e-3, fp8="delayed"),
             r"parallel.fp8=delayed: FP8 needs compute capability ≥ 8.9 .*A100 is sm80 — use parallel.fp8=none")


# ---- the trainers' path: parallel.fp8 → EngineSettings.fp8 -------------------------------

@pytest.mark.parametrize("fp8", ["none", *FP8_RECIPES])
def test_build_megatron_engine_passes_the_recipe(monkeypatch, fp8):
    from moslim_mega.engine.megatron.engine import build_megatron_engine

    seen = []

    class _Built:
        pass

    monkeypatch.setattr(MegatronEngine, "from_pretrained",
                        classmethod(lambda cls, path, role, layout, settings: seen.append(settings) or _Built()))
    parallel = load_config(None, ["parallel.backend=megatron", f"parallel.fp8={fp8}"]).parallel
    build_megatron_engine(parallel, "unused", "causal_lm", EngineSettings(lr=1e-3))
    assert seen[0].fp8 == fp8 and seen[0].lr == 1e-3


def test_build_megatron_engine_refuses_rowwise_on_a_hand_built_config():
    from types import SimpleNamespace

    from moslim_mega.engine.megatron.engine import build_megatron_engine

    parallel = SimpleNamespace(tp=1, pp=1, cp=1, pp_schedule="1f1b", fp8="rowwise")
    with pytest.raises(ConfigError, match="parallel.fp8=rowwise: torchao's recipe of parallel.backend=torch"):
        build_megatron_engine(parallel, "unused", "causal_lm", EngineSettings(lr=1e-3))
