"""Rewarded Soups (paper Eq. 2, Ramé et al. 2023): one policy per dimension, merged at inference.

    θ_λ = Σ_i λ_i θ_i                                                           (Eq. 2)

Policy i is the MORLHF policy of the one-hot weight vector e_i. The merge works on the
checkpoints' safetensors files tensor by tensor (one output shard in memory at a time), so it
also serves sharded checkpoints (``model.safetensors.index.json``) too big to load whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .common import BaselineError

INDEX = "model.safetensors.index.json"


def check_lambdas(lambdas, n: int) -> list[float]:
    lam = [float(x) for x in lambdas]
    if len(lam) != n:
        raise BaselineError(f"lambdas: {len(lam)} weights for {n} policies")
    if any(x < 0 for x in lam) or abs(sum(lam) - 1.0) > 1e-6:
        raise BaselineError(f"lambdas: {lam} must be non-negative and sum to 1")
    return lam


def merge_tensors(tensors: list[torch.Tensor], lambdas: list[float], key: str) -> torch.Tensor:
    """Σ λ_i t_i in float32, cast back to the first tensor's dtype; non-float tensors (buffers
    such as position ids) must agree and are copied."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape != first.shape:
            raise BaselineError(f"tensor {key!r}: shapes {tuple(first.shape)} and {tuple(t.shape)} differ")
    if not first.is_floating_point():
        if any(not torch.equal(first, t) for t in tensors[1:]):
            raise BaselineError(f"tensor {key!r}: non-float tensors differ between checkpoints")
        return first.clone()
    acc = torch.zeros(first.shape, dtype=torch.float32)
    for lam, t in zip(lambdas, tensors):
        acc += lam * t.to(torch.float32)
    return acc.to(first.dtype)


def merge_state_dicts(state_dicts: list[dict], lambdas) -> dict:
    """Eq. 2 on in-memory state dicts (same keys required)."""
    lam = check_lambdas(lambdas, len(state_dicts))
    keys = list(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if set(sd) != set(keys):
            extra = sorted(set(sd) ^ set(keys))[0]
            raise BaselineError(f"state dict {i}: key {extra!r} is not in every state dict")
    return {k: merge_tensors([sd[k] for sd in state_dicts], lam, k) for k in keys}


def safetensors_layout(model_dir) -> dict[str, list[str]]:
    """{shard file: [tensor names]} of a HF checkpoint directory (sharded or single file)."""
    d = Path(model_dir)
    if (d / INDEX).is_file():
        weight_map = json.loads((d / INDEX).read_text())["weight_map"]
        layout: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            layout.setdefault(shard, []).append(key)
        return layout
    files = sorted(p.name for p in d.glob("*.safetensors"))
    if not files:
        raise BaselineError(f"{d}: no *.safetensors files (and no {INDEX})")
    layout = {}
    for name in files:
        with safe_open(d / name, framework="pt") as f:
            layout[name] = list(f.keys())
    return layout


def merge_safetensors(model_dirs: list, lambdas, out_dir) -> Path:
    """θ = Σ λ_i θ_i over HF checkpoint directories → ``out_dir`` with the first one's shard
    layout, config and tokenizer. Tensors are read one at a time from every input."""
    lam = check_lambdas(lambdas, len(model_dirs))
    dirs = [Path(d) for d in model_dirs]
    layouts = [safetensors_layout(d) for d in dirs]
    where = [{k: shard for shard, keys in lay.items() for k in keys} for lay in layouts]
    for i, w in enumerate(where[1:], 1):
        if set(w) != set(where[0]):
            extra = sorted(set(w) ^ set(where[0]))[0]
            raise BaselineError(f"{dirs[i]}: tensor {extra!r} is not in every checkpoint")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for p in dirs[0].iterdir():  # config, generation config, tokenizer, index: from the first input
        if p.is_file() and not p.name.endswith(".safetensors"):
            shutil.copy2(p, out / p.name)
    for shard, keys in layouts[0].items():
        merged = {}
        for key in keys:
            tensors = []
            for d, w in zip(dirs, where):
                with safe_open(d / w[key], framework="pt") as f:
                    tensors.append(f.get_tensor(key))
            merged[key] = merge_tensors(tensors, lam, key)
        save_file(merged, out / shard, metadata={"format": "pt"})
    return out


def lambda_grid(num_dims: int, i: int, j: int, steps: int) -> list[tuple[float, ...]]:
    """λ sweep between policies i and j: (1−t)·e_i + t·e_j for ``steps`` evenly spaced t."""
    if steps < 2:
        raise BaselineError(f"compare.rsoup_lambda_steps: need at least 2 points, got {steps}")
    grid = []
    for s in range(steps):
        t = s / (steps - 1)
        lam = [0.0] * num_dims
        lam[i], lam[j] = 1.0 - t, t
        grid.append(tuple(lam))
    return grid


class SoupCache:
    """Merged policies keyed by λ, written under ``root`` once and loaded on demand as
    (rollout engine, tokenizer) — ``rollout`` config, default the ``hf`` engine."""

    def __init__(self, policy_dirs: list, root, rollout=None):
        from ..config import RolloutConfig

        self.policy_dirs, self.root = [Path(p) for p in policy_dirs], Path(root)
        self.rollout = rollout or RolloutConfig()
        self._models: dict[tuple, tuple] = {}

    def get(self, lambdas):
        from ..rollout import engine_from_dir

        key = tuple(round(float(x), 4) for x in lambdas)
        if key not in self._models:
            name = "lam_" + "_".join(f"{x:.3f}" for x in key)
            path = merge_safetensors(self.policy_dirs, [x / sum(key) for x in key], self.root / name)
            self.close()  # keep one model: λ groups are sampled in turn (free the last first)
            self._models[key] = engine_from_dir(self.rollout, path)
        return self._models[key]

    def close(self) -> None:
        """Release the loaded merge's engine (a vLLM engine holds its KV cache until closed)."""
        for engine, _tok in self._models.values():
            engine.close()
        self._models = {}
