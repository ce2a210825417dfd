"""``build_rollout_engine``: the one place every call site gets its rollout engine from."""

from __future__ import annotations

from pathlib import Path

from ..config import ConfigError, RolloutConfig
from .base import RolloutEngine


def build_rollout_engine(rc: RolloutConfig, *, model, tokenizer, model_dir: str | Path | None) -> RolloutEngine:
    """The engine ``rollout.engine`` names.

    ``model``: the HF module the ``hf`` engine generates with (the actor itself in one process, a
    plain copy under torchrun). ``model_dir``: an HF checkpoint directory holding the same weights
    (the ``vllm`` engine loads from it at start, then receives pushes).
    """
    if rc.engine == "hf":
        from .hf import HFEngine

        if model is None:
            raise ConfigError("rollout.engine=hf: this call site passed no model to generate with")
        return HFEngine(model, tokenizer)
    if rc.engine == "vllm":
        try:
            from .vllm import VLLMEngine
        except ImportError as e:
            raise ConfigError(f"rollout.engine=vllm: vLLM is not importable ({e}); install it with "
                              "`pip install -e .[vllm]`") from e
        if model_dir is None:
            raise ConfigError("rollout.engine=vllm: this call site has no HF checkpoint directory to load vLLM from")
        return VLLMEngine(rc, tokenizer=tokenizer, model_dir=model_dir)
    raise ConfigError(f"rollout.engine: {rc.engine!r} is not one of hf, vllm")


def load_tokenizer(model_dir):
    """A HF directory's tokenizer, pad falling back to EOS (as ``models.build.load_policy``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def engine_from_dir(rc: RolloutConfig, model_dir: str | Path):
    """(engine, tokenizer) for a saved HF policy directory — evaluation and baseline samplers. The
    ``hf`` engine loads the model with ``models.build.load_policy``; ``vllm`` loads it itself (no HF copy)."""
    if rc.engine == "hf":
        from ..models.build import load_policy

        model, tok = load_policy(model_dir)
        return build_rollout_engine(rc, model=model, tokenizer=tok, model_dir=model_dir), tok
    tok = load_tokenizer(model_dir)
    return build_rollout_engine(rc, model=None, tokenizer=tok, model_dir=model_dir), tok
