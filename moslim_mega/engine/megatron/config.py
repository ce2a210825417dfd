"""HF ``config.json`` → megatron-core ``TransformerConfig`` and the ``GPTModel`` arguments.

Only the fields that decide the numbers are translated here (shapes, norms, activation, RoPE,
MoE routing); performance switches (fusions, recomputation, sequence parallelism, the
distributed optimizer) belong to the engine that builds the model, and are left at megatron's
defaults except where a default would need a kernel that may be missing (noted below).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import require_megatron_core
from .dims import Layout, ModelDims, check_fp8_dims, check_layout, model_dims, rope_settings

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

FP8_RECIPES = ("tensorwise", "delayed", "blockwise", "mxfp8")
"""``parallel.fp8`` under the megatron backend: each is megatron-core's ``fp8_recipe`` of the same
name (megatron/core/enums.py ``Fp8Recipe``; its ``custom`` needs a quantizer factory and is not
offered), which ``fp8_utils.get_fp8_recipe`` turns into Transformer Engine's recipe:
``tensorwise`` → ``Float8CurrentScaling`` (scale from this tensor's own amax, per tensor),
``delayed`` → ``DelayedScaling`` (scale from an amax history), ``blockwise`` →
``Float8BlockScaling`` (1×128 / 128×128 blocks), ``mxfp8`` → ``MXFP8BlockScaling`` (Blackwell,
1×32 blocks with E8M0 scales)."""


def fp8_fields(recipe: str) -> dict:
    """The ``TransformerConfig`` FP8 fields for a ``parallel.fp8`` recipe ({} for ``none``)."""
    if recipe == "none":
        return {}
    if recipe not in FP8_RECIPES:
        raise ValueError(f"parallel.fp8={recipe!r}: the megatron backend offers {', '.join(FP8_RECIPES)}")
    return dict(
        # hybrid: E4M3 (more mantissa) for weights and activations in forward, E5M2 (more range)
        # for the gradients in backward — the format every TE recipe above is trained with.
        fp8="hybrid", fp8_recipe=recipe, fp8_margin=0,
        # Delayed scaling takes each scale from the max over the last 1024 steps' amaxes (TE's own
        # DelayedScaling default; megatron's default of 1 most-recent value makes a step's scale
        # follow one outlier). The other recipes compute their scales from the tensor itself and
        # ignore both fields.
        fp8_amax_history_len=1024 if recipe == "delayed" else 1,
        fp8_amax_compute_algo="max" if recipe == "delayed" else "most_recent",
        # The parameters stay in the model's dtype (TE casts them per GEMM): checkpoints, the HF
        # export and the optimizer are the same as without FP8, as under the torch backend.
        fp8_param=False,
    )


@dataclass(frozen=True)
class GPTModelArgs:
    """The ``GPTModel(...)`` keyword arguments that are not in ``TransformerConfig``."""

    vocab_size: int
    """The padded vocabulary (``ModelDims.padded_vocab_size``)."""
    max_sequence_length: int
    share_embeddings_and_output_weights: bool
    rotary_base: float
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    position_embedding_type: str = "rope"
    extra: dict = field(default_factory=dict)

    def kwargs(self) -> dict:
        return {"vocab_size": self.vocab_size, "max_sequence_length": self.max_sequence_length,
                "share_embeddings_and_output_weights": self.share_embeddings_and_output_weights,
                "position_embedding_type": self.position_embedding_type, "rotary_base": self.rotary_base,
                "rope_scaling": self.rope_scaling, "rope_scaling_factor": self.rope_scaling_factor, **self.extra}


def params_dtype(config: dict) -> torch.dtype:
    """The HF config's ``dtype`` (``torch_dtype`` before transformers 5); float32 when unset."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    if name not in _DTYPES:
        raise ValueError(f"config.json: dtype={name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def transformer_config_kwargs(config: dict, layout: Layout = Layout(), *, dims: ModelDims | None = None,
                              dtype: torch.dtype | None = None, fp8: str = "none") -> dict:
    """The ``TransformerConfig`` fields for an HF config (a dict), without importing megatron;
    ``fp8`` a ``parallel.fp8`` recipe (:data:`FP8_RECIPES`), whose dims rule is checked here."""
    dims = dims or model_dims(config, tp=layout.tp)
    check_layout(dims, layout)
    if fp8 != "none":
        check_fp8_dims(dims, layout, fp8)
    dtype = dtype or params_dtype(config)
    kw = dict(
        num_layers=dims.num_layers, hidden_size=dims.hidden_size, num_attention_heads=dims.num_heads,
        num_query_groups=dims.num_query_groups, kv_channels=dims.head_dim, ffn_hidden_size=dims.ffn_hidden_size,
        normalization="RMSNorm", layernorm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,  # SwiGLU: silu(gate) * up
        add_bias_linear=False, add_qkv_bias=dims.qkv_bias,
        attention_dropout=float(config.get("attention_dropout", 0.0)), hidden_dropout=0.0,
        init_method_std=float(config.get("initializer_range", 0.02)),
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.expert_tp,
        # Fused bias-SwiGLU / RoPE / persistent layer norm need Apex or TE kernels; the unfused
        # paths compute the same function.
        bias_activation_fusion=False, apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
    )
    if dims.is_moe:
        kw.update(
            num_moe_experts=dims.num_experts, moe_ffn_hidden_size=dims.moe_ffn_hidden_size,
            moe_router_topk=int(config["num_experts_per_tok"]),
            moe_shared_expert_intermediate_size=dims.shared_expert_ffn_hidden_size,
            moe_shared_expert_gate=True,  # Qwen2-MoE: sigmoid(shared_expert_gate(x)) * shared_expert(x)
            # norm_topk_prob=False (Qwen1.5/Qwen2-MoE): softmax over all experts, then top-k without
            # renormalising — megatron's pre-softmax routing; True = softmax over the top-k only.
            moe_router_pre_softmax=not bool(config.get("norm_topk_prob", False)),
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=float(config.get("router_aux_loss_coef", 0.001)),
            # SequentialMLP experts (one linear_fc1/fc2 per expert): the layout mapping.py writes.
            # The token dispatcher is an engine choice (megatron's default, allgather, builds on CPU;
            # alltoall wants a CUDA stream at construction).
            moe_grouped_gemm=False,
        )
    kw.update(fp8_fields(fp8))
    return kw


def transformer_config(config: dict, layout: Layout = Layout(), *, dims: ModelDims | None = None,
                       dtype: torch.dtype | None = None, fp8: str = "none", **overrides):
    """megatron-core ``TransformerConfig`` for an HF config (a dict); ``fp8`` a ``parallel.fp8``
    recipe; ``overrides`` are further ``TransformerConfig`` fields (an engine's performance
    switches, ``use_cpu_initialization``)."""
    require_megatron_core()
    from megatron.core.transformer import TransformerConfig

    kw = transformer_config_kwargs(config, layout, dims=dims, dtype=dtype, fp8=fp8)
    return TransformerConfig(**{**kw, **overrides})


def gpt_model_args(config: dict, layout: Layout = Layout(), *, dims: ModelDims | None = None) -> GPTModelArgs:
    """The ``GPTModel`` arguments for an HF config (a dict)."""
    dims = dims or model_dims(config, tp=layout.tp)
    base, llama3_factor = rope_settings(config)
    return GPTModelArgs(
        vocab_size=dims.padded_vocab_size, max_sequence_length=int(config.get("max_position_embeddings", 4096)),
        share_embeddings_and_output_weights=dims.tie_embeddings and dims.has_lm_head, rotary_base=base,
        rope_scaling=llama3_factor is not None, rope_scaling_factor=llama3_factor or 8.0)


def layer_spec(config_or_dims):
    """megatron-core's local (no Transformer Engine) layer spec for the model."""
    require_megatron_core()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    dims = config_or_dims if isinstance(config_or_dims, ModelDims) else model_dims(config_or_dims)
    return get_gpt_layer_local_spec(num_experts=dims.num_experts or None, normalization="RMSNorm")
