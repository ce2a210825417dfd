"""Real model shapes of the paper's configurations (the published HF ``config.json`` values).

Only shapes: ``moslim plan`` builds these on the meta device, so nothing is downloaded.
"""

from __future__ import annotations

from transformers import Qwen2Config, Qwen2MoeConfig


def qwen2_0_5b() -> Qwen2Config:
    """Qwen/Qwen2-0.5B (0.49 B parameters, tied embeddings)."""
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=131072,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)


def qwen2_7b() -> Qwen2Config:
    """Qwen/Qwen2-7B (7.62 B parameters)."""
    return Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def qwen2_72b() -> Qwen2Config:
    """Qwen/Qwen2-72B (72.7 B parameters)."""
    return Qwen2Config(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def qwen2_57b_a14b() -> Qwen2MoeConfig:
    """Qwen/Qwen2-57B-A14B: 64 routed experts (8 active) + a shared expert in each of 28 layers."""
    return Qwen2MoeConfig(vocab_size=151936, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                          num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
                          moe_intermediate_size=2560, shared_expert_intermediate_size=20480, num_experts=64,
                          num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                          rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


PRESETS = {"qwen2-0.5b": qwen2_0_5b, "qwen2-7b": qwen2_7b, "qwen2-57b-a14b": qwen2_57b_a14b, "qwen2-72b": qwen2_72b}
