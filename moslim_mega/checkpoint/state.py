"""What goes into a resumable checkpoint, split by how it is stored.

* **Sharded tensors** (torch.distributed.checkpoint): each model's state dict and each
  optimizer's state, taken with ``get_model_state_dict`` / ``get_optimizer_state_dict`` so that
  FSDP2/DTensor-sharded models save their local shards and plain models save whole tensors.
  DCP keys are ``model_<name>.<fqn>`` and ``optim_<name>.…``.
* **Per-rank objects** (``extra_rank<r>.pt``): RNG states (torch CPU/CUDA, python ``random``,
  numpy), the loop's own state (step, data order, ``torch.Generator`` / ``random.Random``
  states, scheduler, KL controller, running statistics, metrics-file offset). Small, pickled.
* **Assets** (rank 0, ``assets/<name>/``): what ``moslim export hf`` needs to rebuild a standard
  HF model without the training code's config: the HF ``config.json``, the tokenizer and a
  ``model.json`` (kind, and for the RM its class counts, preference spec and mapping statistics).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

MODEL_KINDS = ("causal_lm", "reward", "value")
"""``causal_lm``: a HF ``*ForCausalLM``; ``reward``: ``MultiHeadRewardModel``; ``value``: the critic."""


def model_key(name: str) -> str:
    return f"model_{name}"


def optim_key(name: str) -> str:
    return f"optim_{name}"


def rng_state() -> dict:
    """Every global RNG a training step may draw from."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tensor_state(models: dict, optimizers: dict) -> dict:
    """The DCP state dict: ``models`` {name: module}, ``optimizers`` {name: (module, optimizer)}."""
    opts = StateDictOptions(full_state_dict=False, cpu_offload=False)
    sd = {model_key(n): get_model_state_dict(m, options=opts) for n, m in models.items()}
    for n, (m, opt) in optimizers.items():
        sd[optim_key(n)] = get_optimizer_state_dict(m, opt, options=opts)
    return sd


def apply_tensor_state(sd: dict, models: dict, optimizers: dict) -> None:
    """Write a loaded DCP state dict back into the live models and optimizers (strict)."""
    for n, m in models.items():
        set_model_state_dict(m, sd[model_key(n)], options=StateDictOptions(strict=True))
    for n, (m, opt) in optimizers.items():
        set_optimizer_state_dict(m, opt, sd[optim_key(n)])


def write_model_assets(ckpt_dir: Path, name: str, kind: str, model, tokenizer, **meta) -> None:
    """``assets/<name>/``: HF config (+ tokenizer) and ``model.json`` for ``moslim export hf``.

    ``model`` is the HF model itself (causal_lm) or the module whose ``.backbone`` carries the HF
    config (reward, value). ``meta`` must be JSON-serialisable (RM: num_classes, spec, stats).
    """
    assert kind in MODEL_KINDS, kind
    out = Path(ckpt_dir) / "assets" / name
    out.mkdir(parents=True, exist_ok=True)
    hf = model if kind == "causal_lm" else model.backbone
    hf.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / "model.json").write_text(json.dumps({"kind": kind, "key": model_key(name), **meta}, indent=1))


def write_reward_assets(ckpt_dir: Path, name: str, model, tokenizer, spec, stats, max_length: int) -> None:
    """Export files of the multi-head RM: backbone config + tokenizer, class counts, preference
    spec, the running mapping statistics at this step (Eq. 11) and the training truncation."""
    write_model_assets(ckpt_dir, name, "reward", model, tokenizer, num_classes=list(model.num_classes),
                       spec=spec.to_dict(), mapping_stats=stats.state_dict(), max_length=max_length)
