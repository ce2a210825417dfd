"""Tiny random Llama, Qwen2 and Qwen2-MoE models (and a multi-head RM) saved as HF directories.

Shapes are chosen so that every split is exercised: 4 query heads in 2 groups (TP=2 splits whole
groups), 4 layers (PP=2), 4 experts (EP=2), an odd-sized vocabulary (padding rows appear)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 100
COMMON = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def hf_config(arch: str, tied: bool = False):
    from transformers import LlamaConfig, Qwen2Config, Qwen2MoeConfig

    if arch == "llama":
        return LlamaConfig(**COMMON, tie_word_embeddings=tied)
    if arch == "qwen2":
        return Qwen2Config(**COMMON, tie_word_embeddings=tied, rope_theta=1_000_000.0)
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(**COMMON, tie_word_embeddings=tied, moe_intermediate_size=8,
                              shared_expert_intermediate_size=12, num_experts=4, num_experts_per_tok=2)
    raise ValueError(arch)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Every tensor random (norms and biases too: a swapped norm or bias would otherwise pass)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def save_causal_lm(arch: str, out: Path, tied: bool = False, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(hf_config(arch, tied))
    _randomise(model, seed)
    model.save_pretrained(out)
    return out


def save_reward_model(arch: str, out: Path, seed: int = 0) -> Path:
    from transformers import AutoModel

    from moslim_mega.prefs import PreferenceSpec
    from moslim_mega.reward.io import save_reward_model as save_rm
    from moslim_mega.reward.mapping import RunningClassStats
    from moslim_mega.reward.model import MultiHeadRewardModel
    from moslim_mega.world.tokenizer import build_world_tokenizer

    num_classes = (5, 2)
    model = MultiHeadRewardModel(AutoModel.from_config(hf_config(arch)), num_classes)
    _randomise(model, seed)
    spec = PreferenceSpec.from_names(["helpfulness", "harmlessness"], list(num_classes))
    stats = RunningClassStats(num_classes)
    stats.update([torch.softmax(torch.randn(8, k, generator=torch.Generator().manual_seed(k)), -1) for k in num_classes])
    return save_rm(model, build_world_tokenizer(), spec, stats, out, max_length=32)
