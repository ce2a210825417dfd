"""Reward mapping from multi-head class probabilities to one scalar reward (paper Eq. 11).

    r = (1/k) · Σ_i mask_i · (p_i[t_i] − avg_i[t_i]) / std_i[t_i]

``t_i`` is the target class of head i named in the prompt prefix (−1 = not named, mask 0) and
``avg_i`` / ``std_i`` are the mean / std of head i's probability of each class, recorded over
the reward model's training data by :class:`RunningClassStats`.

The fused multi-head kernel takes the mapping as plain values; :meth:`RewardMapper.head_rewards`
hands it this mapper's (:meth:`RewardMapper.kernel_args`).

Public API: :class:`RunningClassStats`, :class:`RewardMapper`, :class:`MappingError`.
"""

# Shapes: B batch, H heads (preference dimensions), K / K_i classes of a head.

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..kernels.multihead_head import REWARD_KINDS, REWARD_NORMALIZE_BY, fused_multihead_reward

__all__ = ["MappingError", "RunningClassStats", "RewardMapper", "from_config"]

STATS_MODES = ("welford", "ema")
KINDS = REWARD_KINDS  # ("zscore", "logprob", "neg_abs_dist"): the kernel's own list
NORMALIZE_BY = REWARD_NORMALIZE_BY  # ("all", "named")


class MappingError(ValueError):
    """Bad input to the reward mapping; the message names the head or field."""


def _check_probs(probs: Sequence[Tensor], num_classes: Sequence[int]) -> int:
    """Validate one batch of per-head probabilities; returns the batch size B."""
    if len(probs) != len(num_classes):
        raise MappingError(f"probs: expected {len(num_classes)} heads, got {len(probs)}")
    batch = None
    for i, (p, k) in enumerate(zip(probs, num_classes)):
        if p.dim() != 2 or p.shape[1] != k:
            raise MappingError(f"probs[{i}] (head {i}): expected shape [B, {k}], got {tuple(p.shape)}")
        if batch is None:
            batch = p.shape[0]
        elif p.shape[0] != batch:
            raise MappingError(f"probs[{i}] (head {i}): batch size {p.shape[0]} != {batch} of head 0")
        if not bool(torch.isfinite(p).all()):
            raise MappingError(f"probs[{i}] (head {i}): contains NaN or Inf")
    return int(batch)


class RunningClassStats:
    """Per (head, class) running mean and population std of the class probability.

    Welford is the default because it gives the exact statistics of a fixed pass over the data,
    independent of batch order and batch size (e.g. a calibration pass with the final weights).
    The paper records a "moving average" during training; that is ``mode="ema"``: an exponential
    moving average of the batch mean and second moment, one step per :meth:`update` call, with
    Adam-style bias correction ``1 − momentum**steps``.
    """

    def __init__(self, num_classes: Sequence[int], mode: str = "welford", momentum: float = 0.99):
        if mode not in STATS_MODES:
            raise MappingError(f"mode: {mode!r} is not one of {STATS_MODES}")
        if not 0.0 <= momentum < 1.0:
            raise MappingError(f"momentum: must be in [0, 1), got {momentum}")
        if len(num_classes) == 0 or any(int(k) < 1 for k in num_classes):
            raise MappingError(f"num_classes: need ≥1 head with ≥1 class each, got {list(num_classes)}")
        self.num_classes = [int(k) for k in num_classes]
        self.mode = mode
        self.momentum = float(momentum)
        self.reset()

    def reset(self) -> None:
        self.count = 0  # examples seen
        self.steps = 0  # update calls with ≥1 example (EMA bias correction)
        # float64 accumulators: float32 sums over ~1e5 examples lose digits in the variance.
        # welford: (mean, M2 = Σ (p − mean)²); ema: (first moment, second moment).
        self._a = [torch.zeros(k, dtype=torch.float64) for k in self.num_classes]
        self._b = [torch.zeros(k, dtype=torch.float64) for k in self.num_classes]

    @torch.no_grad()
    def update(self, probs: Sequence[Tensor]) -> None:
        """Record a batch: ``probs[i]`` is head i's ``[B, K_i]`` probabilities."""
        nb = _check_probs(probs, self.num_classes)
        if nb == 0:
            return
        n = self.count + nb
        for i, p in enumerate(probs):
            p_BK = p.detach().to(torch.float64)
            mean_b_K = p_BK.mean(0)
            if self.mode == "welford":
                # Chan et al. parallel merge: exact for any split of the data into batches.
                m2_b_K = (p_BK - mean_b_K).square().sum(0)
                mean_b_K, m2_b_K = mean_b_K.cpu(), m2_b_K.cpu()
                delta_K = mean_b_K - self._a[i]
                self._a[i] = self._a[i] + delta_K * (nb / n)
                self._b[i] = self._b[i] + m2_b_K + delta_K.square() * (self.count * nb / n)
            else:
                sq_b_K = p_BK.square().mean(0).cpu()
                w = 1.0 - self.momentum
                self._a[i] = self.momentum * self._a[i] + w * mean_b_K.cpu()
                self._b[i] = self.momentum * self._b[i] + w * sq_b_K
        self.count = n
        self.steps += 1

    def _moments(self) -> tuple[list[Tensor], list[Tensor]]:
        if self.count == 0:
            return [torch.zeros_like(a) for a in self._a], [torch.zeros_like(a) for a in self._a]
        if self.mode == "welford":
            return list(self._a), [b / self.count for b in self._b]
        corr = 1.0 - self.momentum**self.steps
        means = [a / corr for a in self._a]
        # E[p²] − E[p]² can dip below 0 by rounding; clamp before the sqrt.
        return means, [(b / corr - m.square()).clamp(min=0.0) for b, m in zip(self._b, means)]

    @property
    def mean(self) -> list[Tensor]:
        """Per-head ``[K_i]`` float32 mean probability of each class."""
        return [m.float() for m in self._moments()[0]]

    @property
    def std(self) -> list[Tensor]:
        """Per-head ``[K_i]`` float32 population std of each class probability."""
        return [v.sqrt().float() for v in self._moments()[1]]

    def state_dict(self) -> dict:
        """Plain python lists and numbers (JSON-serialisable)."""
        keys = ("mean", "M2") if self.mode == "welford" else ("m1", "m2")
        return {
            "mode": self.mode,
            "momentum": self.momentum,
            "num_classes": list(self.num_classes),
            "count": self.count,
            "steps": self.steps,
            "heads": [{keys[0]: a.tolist(), keys[1]: b.tolist()} for a, b in zip(self._a, self._b)],
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; the head layout must match, mode/momentum are adopted."""
        mode = state.get("mode")
        if mode not in STATS_MODES:
            raise MappingError(f"state.mode: {mode!r} is not one of {STATS_MODES}")
        if list(state.get("num_classes", [])) != self.num_classes:
            raise MappingError(f"state.num_classes: {state.get('num_classes')} != {self.num_classes}")
        keys = ("mean", "M2") if mode == "welford" else ("m1", "m2")
        heads = state.get("heads", [])
        if len(heads) != len(self.num_classes):
            raise MappingError(f"state.heads: expected {len(self.num_classes)} heads, got {len(heads)}")
        a, b = [], []
        for i, (h, k) in enumerate(zip(heads, self.num_classes)):
            for key in keys:
                if key not in h or len(h[key]) != k:
                    raise MappingError(f"state.heads[{i}].{key}: missing or not of length {k}")
            a.append(torch.tensor(h[keys[0]], dtype=torch.float64))
            b.append(torch.tensor(h[keys[1]], dtype=torch.float64))
        self.mode, self.momentum = mode, float(state.get("momentum", self.momentum))
        self.count, self.steps = int(state["count"]), int(state.get("steps", 0))
        self._a, self._b = a, b

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.state_dict(), indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> "RunningClassStats":
        state = json.loads(Path(path).read_text())
        stats = cls(state["num_classes"], mode=state["mode"], momentum=state.get("momentum", 0.99))
        stats.load_state_dict(state)
        return stats


class RewardMapper:
    """Maps per-head probabilities and prefix targets to a scalar reward (Eq. 11 and variants).

    kind: ``zscore`` (Eq. 11), ``logprob`` (log p[t]) or ``neg_abs_dist`` (−Σ_c p[c]·|c − t|).
    normalize_by: k in Eq. 11 — ``all`` heads (paper) or only the ``named`` ones per example.
    """

    def __init__(
        self,
        stats: RunningClassStats,
        kind: str = "zscore",
        normalize_by: str = "all",
        std_floor: float = 1e-3,
        clip: float = 0.0,
    ):
        if kind not in KINDS:
            raise MappingError(f"kind: {kind!r} is not one of {KINDS}")
        if normalize_by not in NORMALIZE_BY:
            raise MappingError(f"normalize_by: {normalize_by!r} is not one of {NORMALIZE_BY}")
        if not std_floor > 0.0:
            raise MappingError(f"std_floor: must be > 0 (it guards a division), got {std_floor}")
        if not clip >= 0.0:
            raise MappingError(f"clip: must be ≥ 0 (0 = off), got {clip}")
        self.stats = stats
        self.kind = kind
        self.normalize_by = normalize_by
        self.std_floor = float(std_floor)
        self.clip = float(clip)

    @classmethod
    def from_config(cls, stats: RunningClassStats, mapping_cfg) -> "RewardMapper":
        """Build from a :class:`~moslim_mega.config.MappingConfig`-like object."""
        return cls(
            stats,
            kind=mapping_cfg.kind,
            normalize_by=mapping_cfg.normalize_by,
            std_floor=mapping_cfg.std_floor,
            clip=mapping_cfg.clip,
        )

    def kernel_args(self) -> dict:
        """This mapping as the plain values :func:`~moslim_mega.kernels.multihead_head.fused_multihead_reward`
        takes: per-class ``mean_C`` / ``std_C`` (heads concatenated, std floored; zscore only), kind,
        normalisation and clip."""
        if self.kind == "zscore" and self.stats.count == 0:
            raise MappingError("stats: no examples recorded; fit the statistics before mapping")
        mean_C = std_C = None
        if self.kind == "zscore":
            mean_C = torch.cat(self.stats.mean)
            std_C = torch.cat(self.stats.std).clamp(min=self.std_floor)
        return dict(mean_C=mean_C, std_C=std_C, kind=self.kind, normalize_by=self.normalize_by, clip=self.clip)

    def head_rewards(
        self, hidden_BD: Tensor, weight_CD: Tensor, bias_C: Tensor | None, num_classes: Sequence[int],
        targets_BH: Tensor, impl: str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Per-head probabilities ``[B, C]`` and this mapping's reward ``[B]`` (fp32) straight from the
        reward head's input, in one fused pass (Triton on CUDA, the plain reference elsewhere)."""
        if list(num_classes) != list(self.stats.num_classes):
            raise MappingError(f"num_classes: {list(num_classes)} != the statistics' {self.stats.num_classes}")
        return fused_multihead_reward(
            hidden_BD, weight_CD, bias_C, num_classes, targets_BH, **self.kernel_args(), impl=impl
        )

    def _check_targets(self, targets_BH: Tensor, batch: int) -> None:
        num_heads = len(self.stats.num_classes)
        if targets_BH.dim() != 2 or tuple(targets_BH.shape) != (batch, num_heads):
            got = tuple(targets_BH.shape)
            raise MappingError(f"targets_BH: expected shape [{batch}, {num_heads}], got {got}")
        if targets_BH.dtype.is_floating_point or targets_BH.dtype == torch.bool:
            raise MappingError(f"targets_BH: expected an integer tensor, got {targets_BH.dtype}")
        for i, k in enumerate(self.stats.num_classes):
            t_B = targets_BH[:, i]
            if batch and bool(((t_B < -1) | (t_B >= k)).any()):
                bad = t_B[(t_B < -1) | (t_B >= k)][0].item()
                raise MappingError(f"targets_BH[:, {i}] (head {i}): target {bad} outside [-1, {k})")

    def per_head(self, probs: Sequence[Tensor], targets_BH: Tensor) -> Tensor:
        """Each head's term of Eq. 11 as ``[B, H]`` float32; 0 where the head is not named (−1)."""
        batch = _check_probs(probs, self.stats.num_classes)
        self._check_targets(targets_BH, batch)
        if self.kind == "zscore" and self.stats.count == 0:
            raise MappingError("stats: no examples recorded; fit the statistics before mapping")
        means, stds = (self.stats.mean, self.stats.std) if self.kind == "zscore" else (None, None)
        terms = []
        for i, p in enumerate(probs):
            p_BK = p.float()  # bf16 probabilities would quantise the z-score visibly
            t_B = targets_BH[:, i].to(p_BK.device)
            named_B = t_B >= 0
            t_safe_B = t_B.clamp(min=0)  # −1 rows are computed on class 0, then masked out
            p_t_B = p_BK.gather(1, t_safe_B[:, None]).squeeze(1)
            if self.kind == "zscore":
                mean_K = means[i].to(p_BK.device)
                std_K = stds[i].to(p_BK.device).clamp(min=self.std_floor)
                term_B = (p_t_B - mean_K.index_select(0, t_safe_B)) / std_K.index_select(0, t_safe_B)
            elif self.kind == "logprob":
                term_B = p_t_B.clamp(min=1e-12).log()
            else:
                classes_K = torch.arange(p_BK.shape[1], device=p_BK.device, dtype=p_BK.dtype)
                dist_BK = (classes_K[None, :] - t_safe_B[:, None].to(p_BK.dtype)).abs()
                term_B = -(p_BK * dist_BK).sum(1)
            terms.append(torch.where(named_B, term_B, torch.zeros_like(term_B)))
        return torch.stack(terms, dim=1)

    def __call__(self, probs: Sequence[Tensor], targets_BH: Tensor) -> Tensor:
        """The averaged reward, ``[B]`` float32."""
        terms_BH = self.per_head(probs, targets_BH)
        total_B = terms_BH.sum(1)
        if self.normalize_by == "all":
            reward_B = total_B / terms_BH.shape[1]
        else:
            # Rows with no named head have total 0; dividing by max(k, 1) keeps them at 0.
            k_B = (targets_BH.to(terms_BH.device) >= 0).sum(1).clamp(min=1)
            reward_B = total_B / k_B.to(total_B.dtype)
        if self.clip > 0.0:
            reward_B = reward_B.clamp(-self.clip, self.clip)
        return reward_B


def from_config(stats: RunningClassStats, mapping_cfg) -> RewardMapper:
    """Function form of :meth:`RewardMapper.from_config`."""
    return RewardMapper.from_config(stats, mapping_cfg)
