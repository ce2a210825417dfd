"""HF config → megatron-core ``TransformerConfig`` / ``GPTModel`` arguments, field by field."""

import pytest
import torch

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from moslim_mega.engine.megatron.config import gpt_model_args, transformer_config  # noqa: E402
from moslim_mega.engine.megatron.dims import Layout, LayoutError  # noqa: E402

from .tiny_hf import hf_config  # noqa: E402

DENSE = {"num_layers": 4, "hidden_size": 16, "num_attention_heads": 4, "num_query_groups": 2, "kv_channels": 4,
         "ffn_hidden_size": 24, "normalization": "RMSNorm", "gated_linear_unit": True, "add_bias_linear": False,
         "hidden_dropout": 0.0, "attention_dropout": 0.0, "init_method_std": 0.02, "params_dtype": torch.float32,
         "bf16": False, "fp16": False, "num_moe_experts": None}


def _fields(cfg, names):
    return {n: getattr(cfg, n) for n in names}


def test_llama():
    hf = hf_config("llama").to_dict()
    cfg = transformer_config(hf, Layout(tp=2, pp=2))
    assert _fields(cfg, DENSE) == DENSE
    assert cfg.layernorm_epsilon == hf["rms_norm_eps"] and cfg.add_qkv_bias is False
    assert cfg.activation_func is torch.nn.functional.silu
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (2, 2)
    assert cfg.pipeline_dtype == torch.float32
    args = gpt_model_args(hf, Layout(tp=2))
    assert args.kwargs() == {"vocab_size": 128, "max_sequence_length": 64, "share_embeddings_and_output_weights": False,
                             "position_embedding_type": "rope", "rotary_base": 10000.0, "rope_scaling": False,
                             "rope_scaling_factor": 8.0}


def test_qwen2_bias_tied_embeddings_rope_base_and_dtype():
    hf = {**hf_config("qwen2", tied=True).to_dict(), "dtype": "bfloat16", "rms_norm_eps": 1e-5}
    cfg = transformer_config(hf)
    assert _fields(cfg, {k: v for k, v in DENSE.items() if k not in ("params_dtype", "bf16")}) == \
        {k: v for k, v in DENSE.items() if k not in ("params_dtype", "bf16")}
    assert cfg.add_qkv_bias is True and cfg.add_bias_linear is False  # q/k/v biases only
    assert (cfg.params_dtype, cfg.bf16, cfg.layernorm_epsilon) == (torch.bfloat16, True, 1e-5)
    args = gpt_model_args(hf)
    assert args.share_embeddings_and_output_weights and args.rotary_base == 1_000_000.0


def test_qwen2_moe_experts_shared_expert_and_routing():
    hf = hf_config("qwen2_moe").to_dict()
    cfg = transformer_config(hf, Layout(ep=2))
    assert _fields(cfg, ["num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk",
                         "moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_router_pre_softmax",
                         "moe_router_score_function", "moe_aux_loss_coeff", "moe_grouped_gemm",
                         "expert_model_parallel_size", "expert_tensor_parallel_size", "add_qkv_bias"]) == {
        "num_moe_experts": 4, "moe_ffn_hidden_size": 8, "moe_router_topk": 2,
        "moe_shared_expert_intermediate_size": 12, "moe_shared_expert_gate": True,
        # norm_topk_prob=False: softmax over all experts, top-k not renormalised
        "moe_router_pre_softmax": True, "moe_router_score_function": "softmax", "moe_aux_loss_coeff": 0.001,
        "moe_grouped_gemm": False, "expert_model_parallel_size": 2, "expert_tensor_parallel_size": 1,
        "add_qkv_bias": True}
    renormalised = transformer_config({**hf, "norm_topk_prob": True})
    assert renormalised.moe_router_pre_softmax is False


def test_llama3_rope_scaling_reaches_gpt_model_args():
    hf = {**hf_config("llama").to_dict(), "rope_parameters": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192, "rope_theta": 500000.0}}
    args = gpt_model_args(hf)
    assert (args.rope_scaling, args.rope_scaling_factor, args.rotary_base) == (True, 32.0, 500000.0)


def test_overrides_and_layout_errors():
    hf = hf_config("llama").to_dict()
    assert transformer_config(hf, use_cpu_initialization=True).use_cpu_initialization is True
    with pytest.raises(LayoutError, match="tp=8"):
        transformer_config(hf, Layout(tp=8))
