"""Reward over-optimisation, measured on the policy's own samples (issue 18).

Gao et al. (2022, "Scaling Laws for Reward Model Overoptimization") plot the proxy reward a policy
is optimised against and a *gold* reward against the KL from the reference: the proxy keeps
rising while the gold reward peaks and falls. The embedded world has the gold reward — its oracle
— so every policy step here can log both on the same rollouts:

- ``oracle_reward``: the paper's Eq. 11 mapping fed with the oracle's class as a one-hot
  distribution (same units as the RM's mapped ``reward``), and ``rm_oracle_gap`` = ``reward`` −
  ``oracle_reward``;
- ``agree_<dim>``: Spearman ρ, over the rows that name ``dim``, between the RM's mapped term of
  ``dim`` and the oracle's closeness to the target (−|oracle class − target class|) — how well
  the RM still ranks the policy's samples as the oracle does; ``agree`` is the mean over dims;
- ``oracle_mae``: mean |oracle class − target class| over named (row, dim) cells.

:func:`detect_overoptimisation` reads a run's history of these and says whether the oracle
reward peaked and fell while the RM's reward did not (the over-optimisation signature).

Legend: B rows, H heads (dimensions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..prefs import PreferenceSpec, parse_prefix
from ..world import oracle
from .controllability import spearman

OVEROPT_KEYS = ("oracle_reward", "rm_oracle_gap", "agree", "oracle_mae")


class OracleMonitor:
    """``monitor(prompts, responses, scored, rewarder) -> metrics`` for the policy loop.

    ``prompts`` carry their preference prefixes (as rolled out); ``scored`` is the rewarder's
    :class:`~moslim_mega.policy.workers.RewardOutput` for the same rows. Costs a few ms per step.
    """

    def __init__(self, spec: PreferenceSpec):
        self.spec = spec

    def oracle_classes_BH(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        rows = []
        for prompt, response in zip(prompts, responses):
            _, stripped = parse_prefix(prompt, self.spec)
            classes = oracle.score_classes(stripped, response, self.spec)
            rows.append([classes[n] for n in self.spec.names])
        return torch.tensor(rows, dtype=torch.long).view(len(rows), len(self.spec.names))

    def __call__(self, prompts, responses, scored, rewarder=None) -> dict:
        targets_BH = scored.targets_BH.detach().cpu()
        terms_BH = scored.terms_BH.detach().cpu().float()
        oracle_BH = self.oracle_classes_BH(prompts, responses)
        named_BH = targets_BH >= 0
        close_BH = -(oracle_BH - targets_BH).abs().float()
        out: dict[str, float] = {}
        agree = []
        for h, name in enumerate(self.spec.names):
            rows = named_BH[:, h]
            if int(rows.sum()) < 3:
                continue
            rho = spearman(terms_BH[rows, h].tolist(), close_BH[rows, h].tolist())
            if math.isfinite(rho):
                out[f"agree_{name}"] = rho
                agree.append(rho)
        out["agree"] = float(np.mean(agree)) if agree else float("nan")
        out["oracle_mae"] = float((-close_BH[named_BH]).mean()) if bool(named_BH.any()) else float("nan")
        mapper = getattr(rewarder, "mapper", None)
        if mapper is not None:
            probs = [torch.nn.functional.one_hot(oracle_BH[:, h], dim.num_classes).float()
                     for h, dim in enumerate(self.spec.dimensions)]
            oracle_reward = float(mapper(probs, targets_BH).mean())
            out["oracle_reward"] = oracle_reward
            out["rm_oracle_gap"] = float(scored.reward_B.detach().float().mean()) - oracle_reward
        return out


def _smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (NaN-free input), same length as ``x``."""
    c = np.cumsum(np.insert(x, 0, 0.0))
    n = np.minimum(np.arange(1, len(x) + 1), window)
    return (c[1:] - c[np.arange(1, len(x) + 1) - n]) / n


def detect_overoptimisation(history: Sequence[dict], window: int = 50, drop: float = 0.25,
                            gap_rise: float = 0.1, agree_fall: float = 0.4,
                            oracle_key: str = "oracle_reward") -> dict:
    """Has the policy learned to please the RM where the oracle disagrees?

    Over ``window``-step moving averages, three signals (``signals`` names those that fired;
    ``detected`` when any did):

    - ``oracle_fell``: the oracle reward ends more than ``drop`` (mapped-reward units, i.e. RM-std
      units) below its peak while the RM's reward ends at least at its value at that peak — Gao et
      al.'s picture, the proxy still "improving" while the truth gets worse;
    - ``gap_grew``: the RM−oracle gap (``rm_oracle_gap``) ends more than ``gap_rise`` above where it
      started — the truth stalls while the proxy climbs (seeds 0 and 1 of the demo before the fix:
      +0.20 and +0.14; healthy runs +0.02 to +0.03);
    - ``agreement_fell``: a dimension's on-policy RM–oracle agreement ends more than ``agree_fall``
      below where it started (seeds 0 / 1: helpfulness 0.70 → 0.07 and 0.65 → 0.13; healthy
      runs lose 0.16-0.18 as the samples bunch up at their targets).
    """
    steps = [i for i, row in enumerate(history) if math.isfinite(row.get(oracle_key, float("nan")))]
    if len(steps) < 2:
        return {"detected": False, "reason": f"no {oracle_key} in the history"}
    w = max(1, min(window, len(steps) // 4 or 1))
    gold = _smooth(np.array([history[i][oracle_key] for i in steps]), w)
    proxy = _smooth(np.array([history[i]["reward"] for i in steps]), w)
    # Only full windows may hold the peak: the first few trailing means average 1, 2, … steps and
    # a single lucky batch would pass for a peak.
    peak = w - 1 + int(np.argmax(gold[w - 1:]))
    agree = [history[i].get("agree", float("nan")) for i in steps]
    agree = np.array([a for a in agree if math.isfinite(a)])
    head = _mean_or_nan(agree[:w])
    tail = _mean_or_nan(agree[-w:])
    fell = float(gold[peak] - gold[-1])
    gap_first, gap_final = float(proxy[w - 1] - gold[w - 1]), float(proxy[-1] - gold[-1])
    signals = []
    if fell > drop and proxy[-1] >= proxy[peak]:
        signals.append("oracle_fell")
    if gap_final - gap_first > gap_rise:
        signals.append("gap_grew")
    fallen, dim_finals = [], {}  # per-dimension agreement: first and last window, one pass over the history
    for key in sorted({k for i in steps for k in history[i] if k.startswith("agree_")}):
        vals = np.array([history[i].get(key, float("nan")) for i in steps], dtype=float)
        first, last = vals[:w][np.isfinite(vals[:w])], vals[-w:][np.isfinite(vals[-w:])]
        dim_finals[f"{key}_final"] = _mean_or_nan(last)
        if len(first) and len(last) and _mean_or_nan(first) - _mean_or_nan(last) > agree_fall:
            fallen.append(key[len("agree_"):])
    if fallen:
        signals.append("agreement_fell")
    out = {
        "detected": bool(signals),
        "signals": signals,
        "agreement_fell": fallen,
        "rm_oracle_gap_first": gap_first,
        "rm_oracle_gap_final": gap_final,
        "oracle_peak_step": steps[peak],
        "oracle_peak": float(gold[peak]),
        "oracle_final": float(gold[-1]),
        "oracle_drop_from_peak": fell,
        "rm_reward_at_peak": float(proxy[peak]),
        "rm_reward_final": float(proxy[-1]),
        "agree_first": head,
        "agree_final": tail,
        "window": w,
        "drop_threshold": drop,
        "gap_rise_threshold": gap_rise,
        "agree_fall_threshold": agree_fall,
        **dim_finals,
    }
    if "kl" in history[steps[-1]]:
        kl = _smooth(np.array([history[i]["kl"] for i in steps], dtype=float), w)
        out["kl_at_peak"] = float(kl[peak])
        out["kl_final"] = float(kl[-1])
        # ≤ 100 points of the smoothed curves: the report's reward-vs-KL figure (Gao et al. Fig. 1).
        pick = np.unique(np.linspace(w - 1, len(steps) - 1, min(100, len(steps) - w + 1)).round().astype(int))
        agree_all = np.array([history[i].get("agree", float("nan")) for i in steps], dtype=float)
        out["curve"] = {"step": [steps[j] for j in pick], "kl": kl[pick].tolist(), "rm_reward": proxy[pick].tolist(),
                        "oracle_reward": gold[pick].tolist(),
                        "agree": [None if not math.isfinite(a) else float(a) for a in agree_all[pick]]}
    return out


def _mean_or_nan(x: np.ndarray) -> float:
    return float(x.mean()) if len(x) else float("nan")
