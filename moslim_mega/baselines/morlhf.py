"""MORLHF (paper Eq. 1): one reward model per dimension, one policy per weight vector.

    R = w_1 r_1 + … + w_n r_n                                                   (Eq. 1)

Each r_i comes from a single-head classification RM of dimension i (the multi-head RM with one
head, trained on that dimension's ratings only) read as r_i = E[class] / (K_i − 1) ∈ [0, 1].
The policy is trained by the same controller as MOSLIM (same algorithm, steps, KL) through its
``rewarder`` seam, on prefix-free prompts: a MORLHF policy has no preference input.

Legend: B rows, D preference dimensions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..config import Config
from ..policy.workers import RewardOutput
from ..prefs import PreferenceSpec, strip_prefix
from ..reward.io import load_reward_model
from .common import BaselineError, expected_class_reward, write_dimension_data


def weighted_reward(r_BD: torch.Tensor, w_D: torch.Tensor) -> torch.Tensor:
    """Eq. 1: R_B = Σ_i w_i r_i."""
    if r_BD.shape[-1] != w_D.shape[-1]:
        raise BaselineError(f"weights: {w_D.shape[-1]} weights for {r_BD.shape[-1]} reward dimensions")
    return r_BD @ w_D.to(r_BD.dtype)


def single_dimension_config(cfg: Config, spec: PreferenceSpec, name: str, data_dir) -> Config:
    """The RM config of one dimension: same backbone and budget, one head, its own data files."""
    k = spec[name].num_classes
    prefs = dataclasses.replace(cfg.prefs, dimensions=(spec.canonical(name),), num_classes=(k,))
    return dataclasses.replace(cfg, prefs=prefs, run=dataclasses.replace(cfg.run, data_dir=str(data_dir)))


def train_dimension_rms(cfg: Config, spec: PreferenceSpec, data_dir, out_dir, show_progress: bool = True,
                        timer=None) -> dict[str, Path]:
    """One single-head RM per dimension → {name: rm_dir}. ``timer(stage, fn, *args)`` times each."""
    from ..reward.trainer import train_reward_model

    timer = timer or (lambda _stage, fn, *a, **k: fn(*a, **k))
    out = Path(out_dir)
    dirs = {}
    for name in spec.names:
        ddir = write_dimension_data(data_dir, spec, name, out / f"data_{name}")
        timer(f"rm_{name}", train_reward_model, single_dimension_config(cfg, spec, name, ddir), out / f"rm_{name}",
              show_progress=show_progress)
        dirs[name] = out / f"rm_{name}"
    return dirs


class WeightedRewarder:
    """The controller's reward seam for MORLHF: per-dimension RMs → r_BD → Σ w_i r_i."""

    def __init__(self, rm_dirs: dict[str, Path], weights: tuple[float, ...], spec: PreferenceSpec):
        if len(weights) != len(spec):
            raise BaselineError(f"weights: {len(weights)} weights for {len(spec)} dimensions")
        missing = [n for n in spec.names if n not in rm_dirs]
        if missing:
            raise BaselineError(f"no reward model for dimension {missing[0]!r}")
        self.spec = spec
        self.rms = [load_reward_model(rm_dirs[n]) for n in spec.names]
        self.w_D = torch.tensor(weights, dtype=torch.float32)

    def rewards(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """r_BD, every RM reading the prompt without any preference prefix."""
        base = [strip_prefix(p, self.spec) for p in prompts]
        return torch.stack([expected_class_reward(rm.probs(base, responses)[0]) for rm in self.rms], dim=1)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> RewardOutput:
        r_BD = self.rewards(prompts, responses)
        # targets 0 on every head: the per-dimension reward of every row is logged.
        return RewardOutput(weighted_reward(r_BD, self.w_D), r_BD, torch.zeros_like(r_BD, dtype=torch.long))


def train_weighted_policy(cfg: Config, out_dir, init_dir, rm_dirs, prompts_path, weights, spec,
                          show_progress: bool = True) -> dict:
    """One MORLHF policy for one weight vector (Rewarded Soups calls it with one-hot weights)."""
    from ..policy.controller import train_policy

    return train_policy(cfg, out_dir, init_dir, None, prompts_path, show_progress=show_progress,
                        rewarder=WeightedRewarder(rm_dirs, weights, spec))
