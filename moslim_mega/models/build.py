"""Build HF-architecture models and tokenizers: tiny random ones for the embedded world, or
any local HF checkpoint (``trust_remote_code`` off unless the config turns it on).

No downloads at run time: a ``name_or_path`` that is not ``tiny-*`` must be a local directory
unless ``HF_HUB_OFFLINE`` is unset and the user has the hub cache — transformers decides.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    Qwen2Config,
)

from ..data.template import apply_template_choice

TINY = {"tiny-llama": LlamaConfig, "tiny-qwen2": Qwen2Config}


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be built from the given name or path."""


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def build_tokenizer(model_cfg, extra_names=()):
    """The world tokenizer for tiny models, else the checkpoint's own (pad token ensured)."""
    if model_cfg.name_or_path in TINY:
        from ..world.tokenizer import build_world_tokenizer

        return apply_template_choice(build_world_tokenizer(extra_names), model_cfg.chat_template)
    path = model_cfg.name_or_path
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a tokenizer from model.name_or_path={path!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return apply_template_choice(tok, model_cfg.chat_template)


def tiny_config(model_cfg, tokenizer) -> PretrainedConfig:
    cls = TINY[model_cfg.name_or_path]
    return cls(
        vocab_size=len(tokenizer),
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_heads,
        max_position_embeddings=model_cfg.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )


def _from_pretrained(auto_cls, model_cfg):
    path = model_cfg.name_or_path
    if not Path(path).exists():
        raise ModelLoadError(
            f"model.name_or_path={path!r} is neither a tiny-* preset ({', '.join(TINY)}) nor a local directory"
        )
    try:
        return auto_cls.from_pretrained(
            path, trust_remote_code=model_cfg.trust_remote_code, dtype=_dtype(model_cfg.dtype)
        )
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load {auto_cls.__name__} from {path!r}: {e}") from None


def build_causal_lm(model_cfg, tokenizer, seed: int = 0):
    """A causal LM (policy / reference): random tiny, or loaded from a local checkpoint."""
    if model_cfg.name_or_path in TINY:
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(tiny_config(model_cfg, tokenizer)).to(_dtype(model_cfg.dtype))
    return _from_pretrained(AutoModelForCausalLM, model_cfg)


def build_backbone(model_cfg, tokenizer, seed: int = 0):
    """A headless transformer (last hidden states) for the reward and value models."""
    if model_cfg.name_or_path in TINY:
        torch.manual_seed(seed)
        return AutoModel.from_config(tiny_config(model_cfg, tokenizer)).to(_dtype(model_cfg.dtype))
    return _from_pretrained(AutoModel, model_cfg)


def load_policy(model_dir) -> tuple[torch.nn.Module, object]:
    """(model in eval mode, tokenizer) from a HF directory such as an SFT run's ``model/``."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"policy directory {path}: not a HF model directory (no config.json)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a policy from {path}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer
