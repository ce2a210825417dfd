"""Float8 training (``parallel.fp8``) — applied from outside the model, before TP and FSDP2.

torchao's ``convert_to_float8_training`` swaps chosen ``nn.Linear`` modules for ``Float8Linear``:
the matmuls of forward and backward run on float8 operands scaled per tensor (``tensorwise``) or
per row (``rowwise``), while the parameters, their gradients and the optimizer state stay in the
model's dtype — so checkpoints and HF exports are the plain bf16/fp32 weights with unchanged names.

What is converted (:func:`fp8_module_filter`): the ``nn.Linear`` modules inside the decoder layers
(attention q/k/v/o, MLP gate/up/down, a Qwen2-MoE shared expert) whose in and out features are
both multiples of 16 — ``torch._scaled_mm``'s requirement. Never converted: the embedding, the LM
head (the policy's log-probs and its vocabulary-parallel kernel read it in full precision), the
RM's classification heads and the PPO value head (tiny outputs, and the rewards/values must not
carry fp8 rounding), an MoE router (``mlp.gate``: routing decisions are discontinuous in its
logits) and a frozen model (the reference policy). ``parallel.fp8_auto_filter=true`` also skips
linears below torchao's H100 size thresholds (``_auto_filter_for_recipe``: e.g. tensorwise skips
K ≤ 4096 with N ≤ 1024), where the casts cost more than the float8 matmul saves.

Composition (measured with 2 gloo processes, tests/parallel/test_fp8_equivalence.py):
- FSDP2: ``tensorwise`` all-gathers the weights in float8 (``enable_fsdp_float8_all_gather``,
  half of bf16's bytes); torchao supports that for tensorwise scaling only, so ``rowwise``
  all-gathers in the model's (or the MixedPrecisionPolicy's) dtype.
- TP: the ordinary DTensor Colwise/Rowwise styles of :mod:`.plans` on ``Float8Linear`` give the
  single-process fp8 numbers (the scales are computed on the full DTensor). torchao's
  ``Float8ColwiseParallel`` / ``Float8RowwiseParallel`` only pay with sequence parallelism
  (float8 all-gather of sequence-sharded activations), which the plan here does not use: their
  inputs are replicated, there is nothing to all-gather, and their local-shard scales moved the
  loss by 3e-4 and gradients by 7e-3 against the single-process fp8 step. So they are not used.
- Pipeline (tests/parallel/test_pipeline_equivalence.py): ``parallelize_stage`` converts each
  stage after the split, so the filter reads the stage's pruned decoder and picks its share of the
  whole model's linears under their global names. Tensorwise activation scales are per micro-batch
  tensor, and the engine pads a step's micro-batches to one shape: the padding rows enter the amax
  (the pp step equals the single-process step on those padded micro-batches, bit for bit at pp=2).

On a machine without CUDA, float8 matmuls are emulated (``Float8LinearConfig(emulate=True)``:
fp8-rounded operands, fp32 matmul) — same numerics, no speed-up; a log line says so.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch import nn

from ..config import ConfigError


FP8_DIM_MULTIPLE = 16
"""``torch._scaled_mm`` needs both matrix dims of a float8 GEMM to be multiples of 16."""


def fp8_enabled(pc) -> bool:
    return getattr(pc, "fp8", "none") != "none"


def decoder_layers(model) -> list[nn.Module]:
    """The transformer's decoder layers of a causal LM, a multi-head RM, a value model or a pipeline
    stage of one of them (parallel/pipeline.py ``StageModule``)."""
    # Recognised by its marker, not isinstance: pipeline.py imports parallelize.py, which imports
    # this module (an import cycle otherwise, tests/test_import_graph.py).
    if getattr(model, "is_pipeline_stage", False):
        # A pipeline stage is converted after the split (parallelize_stage), so the filter sees the
        # stage, not the model: it has no ``base_model_prefix`` of its own but names its (pruned)
        # backbone ``decoder``, whose layers are an ``nn.ModuleDict`` keyed by global layer index —
        # iterating that would give the keys, hence ``values()``. The converted set is then the
        # stage's share of the unsplit model's (same FQNs), and the head on the last stage stays out.
        backbone = model.decoder
    else:
        backbone = model.backbone if hasattr(model, "backbone") else getattr(model, model.base_model_prefix)
    layers = backbone.layers
    return list(layers.values()) if isinstance(layers, nn.ModuleDict) else list(layers)


def fp8_module_filter(model, recipe: str, auto_filter: bool = False):
    """``module_filter_fn(module, fqn) -> bool`` for ``convert_to_float8_training``: True only for
    an ``nn.Linear`` inside the decoder layers, not an MoE router, with both dims % 16 == 0 (and,
    with ``auto_filter``, above torchao's size thresholds for ``recipe``)."""
    targets = {id(m) for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, nn.Linear)}
    size_ok = _torchao_size_filter(recipe) if auto_filter else None

    def keep(mod: nn.Module, fqn: str) -> bool:
        if id(mod) not in targets or fqn.rsplit(".", 1)[-1] == "gate":
            return False
        n, k = mod.weight.shape
        if n % FP8_DIM_MULTIPLE or k % FP8_DIM_MULTIPLE:
            return False
        return size_ok is None or size_ok(mod, fqn)

    return keep


def _torchao_size_filter(recipe: str):
    from torchao.float8.float8_linear_utils import _auto_filter_for_recipe

    return _auto_filter_for_recipe(recipe, filter_fqns=[])


def fp8_linear_config(recipe: str, fsdp: bool, emulate: bool):
    """torchao's ``Float8LinearConfig`` for a recipe name; float8 FSDP all-gather for tensorwise."""
    from torchao.float8 import Float8LinearConfig

    cfg = Float8LinearConfig.from_recipe_name(recipe)
    # torchao asserts enable_fsdp_float8_all_gather is tensorwise-only (config.py __post_init__).
    return dataclasses.replace(cfg, emulate=emulate, enable_fsdp_float8_all_gather=fsdp and recipe == "tensorwise")


def fp8_emulate() -> bool:
    """True without CUDA (CPU emulation). A CUDA device must have float8 tensor cores (sm89+)."""
    if not torch.cuda.is_available():
        return True
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ConfigError(f"parallel.fp8 needs a GPU with float8 matmuls (compute capability ≥ 8.9: L4/L40/H100/"
                          f"H200/B200); {torch.cuda.get_device_name()} is sm{major}{minor} — use parallel.fp8=none")
    return False


def apply_fp8(model, pc, fsdp: bool = False):
    """Convert ``model``'s decoder-layer linears in place for ``parallel.fp8`` (no-op for ``none``);
    call before TP and FSDP2. Returns the fully qualified names of the converted linears."""
    if not fp8_enabled(pc) or getattr(pc, "backend", "torch") != "torch":
        # Under parallel.backend=megatron the engine runs Transformer Engine's FP8 itself (its
        # recipes, e.g. delayed, are not torchao's); a model that reaches here is not trained.
        return []
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise ConfigError(f"parallel.fp8={pc.fp8} needs torchao (pip install -e '.[fp8]', or torchao==0.18.0)") from None
    emulate = fp8_emulate()
    keep = fp8_module_filter(model, pc.fp8, pc.fp8_auto_filter)
    chosen = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and keep(m, n)]
    convert_to_float8_training(model, module_filter_fn=keep, config=fp8_linear_config(pc.fp8, fsdp, emulate))
    _say(f"parallel.fp8={pc.fp8}: {len(chosen)} decoder-layer linears of {type(model).__name__} in float8"
         + (", float8 FSDP all-gather" if fsdp and pc.fp8 == "tensorwise" else "")
         + (" (emulated: no CUDA — fp8-rounded operands, fp32 matmuls: same numerics, no speed-up)" if emulate else "")
         + ("" if chosen else f" — none qualified (dims % 16, fp8_auto_filter={pc.fp8_auto_filter}): "
            "the model trains in its own dtype"))
    return chosen


def _say(line: str) -> None:
    from . import dist as pdist

    if pdist.is_main():  # one line per run, not one per rank
        print(line, file=sys.stderr, flush=True)


def apply_fp8_models(pc, *models) -> None:
    """``apply_fp8`` on each trained model of a single-process stage (None entries skipped): what
    ``parallelize_policy`` / ``parallelize_value`` do under torchrun."""
    for model in models:
        if model is not None:
            apply_fp8(model, pc)
