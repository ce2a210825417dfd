"""Tiny models and micro-batches shared by the pipeline tests (not a test module itself)."""

import torch
from transformers import AutoModel, AutoModelForCausalLM, LlamaConfig, Qwen2Config

from moslim_mega.models.value import ValueModel
from moslim_mega.reward.model import MultiHeadRewardModel

V, LAYERS = 61, 4
NUM_CLASSES = (3, 2)


def llama_cfg(tie: bool = False, layers: int = LAYERS):
    return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=tie, attn_implementation="eager")


def qwen_cfg(layers: int = LAYERS):
    return Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       tie_word_embeddings=False, attn_implementation="eager")


def build(role: str, seed: int = 0, tie: bool = False, qwen: bool = False):
    """The same model on every rank (same seed): what the pipeline splits and the reference trains."""
    torch.manual_seed(seed)
    cfg = qwen_cfg() if qwen else llama_cfg(tie)
    if role == "causal_lm":
        return AutoModelForCausalLM.from_config(cfg)
    backbone = AutoModel.from_config(cfg)
    if role == "reward":
        return MultiHeadRewardModel(backbone, NUM_CLASSES)
    model = ValueModel(backbone)
    torch.nn.init.normal_(model.value_head.weight, std=0.1)  # a zero head would give zero backbone grads
    return model


def skeleton(role: str):
    """``build_skeleton(config)`` of a role: the architecture without weights (run on meta)."""
    def make(config):
        if role == "causal_lm":
            return AutoModelForCausalLM.from_config(config)
        backbone = AutoModel.from_config(config)
        return MultiHeadRewardModel(backbone, NUM_CLASSES) if role == "reward" else ValueModel(backbone)
    return make


def micro_batches(n: int, B: int = 2, T: int = 9, seed: int = 1, ragged: bool = True) -> list[dict]:
    """``n`` right-padded micro-batches; with ``ragged`` the last one is shorter and has fewer rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b, t = (B - 1, T - 3) if ragged and i == n - 1 and B > 1 else (B, T)
        ids = torch.randint(0, V, (b, t), generator=g)
        mask = torch.ones(b, t, dtype=torch.long)
        mask[0, t - 2:] = 0  # a right-padded row
        labels = torch.stack([torch.randint(0, k, (b,), generator=g) for k in NUM_CLASSES], 1)
        adv = torch.randn(b, t, generator=g)
        old = -torch.rand(b, t, generator=g)
        out.append({"ids_BT": ids, "mask_BT": mask, "labels_BH": labels, "adv_BT": adv, "old_logp_BT": old})
    return out
