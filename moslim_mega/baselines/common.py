"""What the baselines share: per-dimension data files, prefix-free prompts, and how a MOSLIM
prefix is read as a baseline's preference weights at evaluation time.

Legend: B rows, D preference dimensions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..prefs import PreferenceSpec, parse_prefix
from ..reward.data import RecordError, read_jsonl


class BaselineError(ValueError):
    """Bad baseline input (weights, directions, checkpoints); the message names the field."""


def preference_weights(prompt: str, spec: PreferenceSpec) -> tuple[tuple[float, ...], str]:
    """(weights_D, base prompt) for a prefixed prompt: 1 on each named dimension, 0 elsewhere,
    uniform when nothing is named. The level is dropped — MORLHF, Rewarded Soups and DPA take a
    mix of dimensions, not an intensity (the paper's Figure 5 shows baselines flat for this reason)."""
    targets, base = parse_prefix(prompt, spec)
    if not targets:
        return tuple(1.0 for _ in spec.names), base
    return tuple(1.0 if n in targets else 0.0 for n in spec.names), base


def parse_weight_vector(text: str, num_dims: int, field: str) -> tuple[float, ...]:
    """``"1,1,0"`` → weights summing to 1; BaselineError names ``field`` on a bad vector."""
    try:
        w = [float(x) for x in text.replace(";", ",").split(",") if x.strip()]
    except ValueError:
        raise BaselineError(f"{field}: {text!r} is not a comma-separated list of numbers") from None
    if len(w) != num_dims:
        raise BaselineError(f"{field}: {text!r} has {len(w)} weights for {num_dims} dimensions")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise BaselineError(f"{field}: {text!r} needs non-negative weights with a positive sum")
    return tuple(x / sum(w) for x in w)


def write_dimension_data(data_dir, spec: PreferenceSpec, name: str, out_dir) -> Path:
    """rm_train/rm_eval jsonl with only ``name``'s rating, for a single-head RM of that dimension."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    canon = spec.canonical(name)
    for split in ("rm_train", "rm_eval"):
        with open(out / f"{split}.jsonl", "w") as f:
            for where, rec in read_jsonl(Path(data_dir) / f"{split}.jsonl"):
                ratings = rec.get("ratings") if isinstance(rec, dict) else None
                if not isinstance(ratings, dict):
                    raise RecordError(f"{where}: missing or non-object field 'ratings'")
                kept = {k: v for k, v in ratings.items() if spec.canonical(k) == canon}
                if not kept:
                    raise RecordError(f"{where}: ratings has no {canon!r}")
                f.write(json.dumps({**rec, "ratings": kept}) + "\n")
    return out


def write_prefix_free_prompts(src, spec: PreferenceSpec, dst) -> Path:
    """The policy prompts without their prefixes: MORLHF and Rewarded Soups policies have no
    preference input (their preference lives in the reward weights / the weight merge)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "w") as f:
        for where, rec in read_jsonl(src):
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise RecordError(f"{where}: missing string field 'prompt'")
            f.write(json.dumps({"prompt": parse_prefix(rec["prompt"], spec)[1]}) + "\n")
    return dst


def expected_class_reward(probs_BK: torch.Tensor) -> torch.Tensor:
    """r_B = E[class] / (K − 1) ∈ [0, 1]: a single-head classification RM read as a scalar."""
    K = probs_BK.shape[-1]
    classes_K = torch.arange(K, dtype=probs_BK.dtype, device=probs_BK.device)
    return (probs_BK * classes_K).sum(-1) / max(1, K - 1)
