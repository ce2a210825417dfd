"""What a Megatron conversion needs to know about a model, read from its HF ``config.json``.

No megatron import here: the dimensions, the parallel layout and their checks are plain Python so
that the mapping (``mapping.py``) and its tests run without megatron-core.

Supported: ``LlamaForCausalLM`` / ``LlamaModel``, ``Qwen2ForCausalLM`` / ``Qwen2Model`` and
``Qwen2MoeForCausalLM`` / ``Qwen2MoeModel`` (every layer sparse, with the shared expert). The
``*Model`` forms are RM backbones (no LM head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ARCHS = ("llama", "qwen2", "qwen2_moe")
VOCAB_MULTIPLE = 128  # Megatron-LM's default make_vocab_size_divisible_by


class ConversionError(ValueError):
    """A model, layout or checkpoint that the Megatron conversion cannot handle; names the field."""


class UnsupportedModelError(ConversionError):
    """An architecture or config feature with no Megatron mapping here."""


class LayoutError(ConversionError):
    """A TP/PP/EP layout that does not divide the model's heads, layers, experts or vocabulary."""


@dataclass(frozen=True)
class ModelDims:
    """The shapes that decide every tensor's Megatron name and shape."""

    arch: str
    """llama | qwen2 | qwen2_moe (HF ``model_type``)."""
    num_layers: int
    hidden_size: int
    num_heads: int
    num_query_groups: int
    """HF ``num_key_value_heads``: K and V heads, one per query group."""
    head_dim: int
    ffn_hidden_size: int
    """Dense MLP width (HF ``intermediate_size``); unused by a Qwen2-MoE layer."""
    vocab_size: int
    padded_vocab_size: int
    """Rows of Megatron's embedding / output layer: ``vocab_size`` rounded up (zero rows appended)."""
    tie_embeddings: bool
    qkv_bias: bool
    has_lm_head: bool
    """False for an RM backbone (HF ``*Model``): no ``output_layer`` is written."""
    hf_prefix: str
    """``"model."`` before the decoder's HF tensor names of a ``*ForCausalLM``; ``""`` for a backbone."""
    num_experts: int = 0
    moe_ffn_hidden_size: int = 0
    shared_expert_ffn_hidden_size: int = 0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


@dataclass(frozen=True)
class Layout:
    """A Megatron parallel layout: tensor, pipeline (+ virtual), expert and expert-tensor parallel sizes."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int | None = None
    """Expert tensor parallel size; None = tp (megatron-core's default)."""
    vpp: int = 1
    """Virtual pipeline stages (model chunks) per pipeline rank, for the interleaved schedule."""

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def to_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "ep": self.ep, "etp": self.expert_tp, "vpp": self.vpp}


def _arch(config: dict) -> str:
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        archs = config.get("architectures")
        raise UnsupportedModelError(
            f"config.json: model_type={model_type!r} (architectures={archs}): the Megatron conversion "
            f"supports {', '.join(ARCHS)}")
    return model_type


def _require(config: dict, field: str):
    if config.get(field) is None:
        raise UnsupportedModelError(f"config.json: {field} is missing")
    return config[field]


def rope_settings(config: dict) -> tuple[float, float | None]:
    """(rope base, llama3 scaling factor or None) from ``rope_parameters`` (transformers ≥5) or
    ``rope_theta`` + ``rope_scaling`` (older configs).

    Megatron's ``GPTModel`` knows plain RoPE and the Llama-3.1 scaling with its published constants
    (low/high frequency factors 1 and 4, original context 8192); anything else has no equivalent.
    """
    params = config.get("rope_parameters") or {}
    scaling = params if params.get("rope_type", "default") != "default" else config.get("rope_scaling")
    base = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return base, None
    kind = scaling.get("rope_type", scaling.get("type"))
    llama3_constants = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if kind == "llama3" and all(float(scaling.get(k, v)) == v for k, v in llama3_constants.items()):
        return base, float(scaling["factor"])
    raise UnsupportedModelError(f"config.json: rope scaling {scaling!r} has no megatron-core GPTModel equivalent "
                                "(only llama3 with factors 1/4 and original context 8192)")


def _check_features(config: dict, arch: str) -> None:
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"config.json: hidden_act={act!r}; the mapping writes a SwiGLU MLP (silu)")
    if arch == "llama" and (config.get("attention_bias") or config.get("mlp_bias")):
        field = "attention_bias" if config.get("attention_bias") else "mlp_bias"
        raise UnsupportedModelError(f"config.json: {field}=true; Llama with biases is not mapped "
                                    "(Megatron's add_bias_linear would also add biases to other layers)")
    if arch != "llama" and config.get("use_sliding_window"):
        raise UnsupportedModelError("config.json: use_sliding_window=true; megatron-core GPTModel has no "
                                    "per-layer sliding window here")
    if arch == "qwen2_moe":
        if int(config.get("decoder_sparse_step", 1)) != 1 or config.get("mlp_only_layers"):
            raise UnsupportedModelError(
                "config.json: decoder_sparse_step/mlp_only_layers make some layers dense; only all-MoE "
                "Qwen2-MoE models (every released one) are mapped")
        if not config.get("shared_expert_intermediate_size"):
            raise UnsupportedModelError("config.json: shared_expert_intermediate_size is missing or 0")
    rope_settings(config)


def padded_vocab(vocab_size: int, tp: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """``vocab_size`` rounded up to a multiple of lcm(``multiple``, tp).

    Megatron-LM pads to ``multiple × tp``, which makes the checkpoint's embedding shape depend on
    the TP size it was written with; the lcm keeps one shape for every power-of-two TP up to
    ``multiple``, so a checkpoint converted once loads under any of those layouts.
    """
    step = math.lcm(multiple, tp)
    return -(-vocab_size // step) * step


def model_dims(config: dict, *, tp: int = 1, vocab_multiple: int = VOCAB_MULTIPLE,
               backbone: bool | None = None) -> ModelDims:
    """The dimensions of an HF ``config.json`` (as a dict); raises naming an unsupported field.

    ``backbone``: True for an RM backbone (a ``*Model``: no LM head, no ``model.`` prefix); None
    reads it from ``architectures`` (a ``*ForCausalLM``, or none listed, is a causal LM).
    """
    arch = _arch(config)
    _check_features(config, arch)
    heads = int(_require(config, "num_attention_heads"))
    hidden = int(_require(config, "hidden_size"))
    archs = config.get("architectures") or []
    if backbone is None:
        backbone = bool(archs) and not any(a.endswith("ForCausalLM") for a in archs)
    has_lm_head = not backbone
    qkv_bias = arch != "llama" and bool(config.get("qkv_bias", True))  # Qwen2: q/k/v biases, o_proj none
    vocab = int(_require(config, "vocab_size"))
    dims = ModelDims(
        arch=arch, num_layers=int(_require(config, "num_hidden_layers")), hidden_size=hidden, num_heads=heads,
        num_query_groups=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads),
        ffn_hidden_size=int(_require(config, "intermediate_size")), vocab_size=vocab,
        padded_vocab_size=padded_vocab(vocab, tp, vocab_multiple),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
        has_lm_head=has_lm_head, hf_prefix="model." if has_lm_head else "",
    )
    if arch == "qwen2_moe":
        dims = ModelDims(**{**dims.__dict__, "num_experts": int(_require(config, "num_experts")),
                            "moe_ffn_hidden_size": int(_require(config, "moe_intermediate_size")),
                            "shared_expert_ffn_hidden_size": int(config["shared_expert_intermediate_size"])})
    if dims.num_heads % dims.num_query_groups:
        raise UnsupportedModelError(f"config.json: num_attention_heads={heads} is not a multiple of "
                                    f"num_key_value_heads={dims.num_query_groups}")
    return dims


def check_layout(dims: ModelDims, layout: Layout) -> None:
    """Raise :class:`LayoutError` naming the first size that the layout does not divide."""
    for name, size in (("tp", layout.tp), ("pp", layout.pp), ("ep", layout.ep), ("etp", layout.expert_tp),
                       ("vpp", layout.vpp)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise LayoutError(f"{name}={size!r}: expected an integer >= 1")
    checks = [
        ("tp", layout.tp, "num_attention_heads", dims.num_heads),
        ("tp", layout.tp, "num_key_value_heads (query groups)", dims.num_query_groups),
        ("tp", layout.tp, "padded vocabulary", dims.padded_vocab_size),
        ("pp", layout.pp, "num_hidden_layers", dims.num_layers),
        ("pp×vpp", layout.pp * layout.vpp, "num_hidden_layers", dims.num_layers),
    ]
    if dims.is_moe:
        checks += [("ep", layout.ep, "num_experts", dims.num_experts),
                   ("etp", layout.expert_tp, "moe_intermediate_size", dims.moe_ffn_hidden_size),
                   ("tp", layout.tp, "shared_expert_intermediate_size", dims.shared_expert_ffn_hidden_size)]
    else:
        checks.append(("tp", layout.tp, "intermediate_size", dims.ffn_hidden_size))
        if layout.ep != 1:
            raise LayoutError(f"ep={layout.ep}: expert parallelism needs a MoE model ({dims.arch} is dense)")
    for name, size, field, value in checks:
        if value % size:
            raise LayoutError(f"{name}={size} does not divide {field}={value}")


def fp8_align(recipe: str) -> int:
    """What every GEMM dimension of a Transformer Engine FP8 linear must be a multiple of: 16
    (TE's FP8 GEMM rule for per-tensor and blockwise scaling), 32 for MXFP8 (its 1×32 scaling
    blocks) — megatron-core's ``fp8_utils.get_fp8_align_size``, without importing it."""
    return 32 if recipe == "mxfp8" else 16


def check_fp8_dims(dims: ModelDims, layout: Layout, recipe: str) -> None:
    """Raise :class:`LayoutError` naming the first HF size that makes one rank's FP8 linear (TE's
    fused q/k/v, attention output, MLP fc1/fc2) not a multiple of :func:`fp8_align` — before TE
    would assert on it deep inside the first forward. The token dimension is the engine's to pad."""
    align = fp8_align(recipe)
    tp = layout.tp
    qkv = dims.head_dim * (dims.num_heads + 2 * dims.num_query_groups)
    sizes = [("hidden_size", dims.hidden_size, dims.hidden_size),
             ("head_dim × (num_attention_heads + 2 × num_key_value_heads) / tp", qkv, qkv // tp),
             ("head_dim × num_attention_heads / tp", dims.head_dim * dims.num_heads,
              dims.head_dim * dims.num_heads // tp),
             ("intermediate_size / tp", dims.ffn_hidden_size, dims.ffn_hidden_size // tp)]
    for field, whole, per_rank in sizes:
        if per_rank % align:
            raise LayoutError(f"parallel.fp8={recipe}: {field} = {per_rank} (from {whole}) is not a multiple of "
                              f"{align}, which Transformer Engine's FP8 GEMMs need; use parallel.fp8=none for "
                              "this model")
