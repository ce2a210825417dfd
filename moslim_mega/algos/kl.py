"""KL(π‖π_ref) penalty of Eq. 12: per-token estimators and the coefficient (β) controllers.

Legend: B batch (sequences), T tokens. ``logp_BT`` are log-probs of the SAMPLED tokens under the
policy π (the samples come from π), ``ref_logp_BT`` the same tokens under the SFT reference.

Public API: :func:`kl_penalty`, :data:`KL_ESTIMATORS`, :class:`FixedKLController`,
:class:`AdaptiveKLController`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .core import AlgoError, check_same_shape

__all__ = ["KL_ESTIMATORS", "kl_penalty", "FixedKLController", "AdaptiveKLController"]

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp_BT: Tensor, ref_logp_BT: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(π‖π_ref) from tokens sampled from π (Schulman, "Approximating KL").

    k1 = log π − log π_ref: unbiased, the literal log-ratio of Eq. 12, but can be negative.
    k2 = ½(log π − log π_ref)²: biased, low variance, ≥ 0.
    k3 = exp(d) − d − 1 with d = log π_ref − log π: unbiased and ≥ 0. Computed as expm1(d) − d,
    which keeps precision when π ≈ π_ref (d ≈ 0, the usual case early in training).
    """
    check_same_shape(logp_BT=logp_BT, ref_logp_BT=ref_logp_BT)
    if estimator == "k1":
        return logp_BT - ref_logp_BT
    if estimator == "k2":
        return 0.5 * (logp_BT - ref_logp_BT) ** 2
    if estimator == "k3":
        d = ref_logp_BT - logp_BT
        return torch.expm1(d) - d
    raise AlgoError(f"estimator: unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def _check_coef(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise AlgoError(f"{name}: must be a finite number >= 0, got {value!r}")
    return value


class FixedKLController:
    """Constant β (Eq. 12 as written)."""

    def __init__(self, coef: float):
        self.value = _check_coef("coef", coef)

    def update(self, current_kl: float, n_samples: int) -> None:
        """No-op; present so both controllers share one interface."""


class AdaptiveKLController:
    """Adaptive β of Ziegler et al. 2019 (§2.2), a departure from the paper's fixed β that keeps the
    measured KL near ``target``: e = clip(KL/target − 1, −0.2, 0.2), β ← β·(1 + e·n/horizon).

    ``current_kl`` is the mean per-sequence KL of the batch and ``n_samples`` the number of sequences
    it was measured on, so the adaptation speed per sample does not depend on the batch size.
    """

    def __init__(self, init_coef: float, target: float, horizon: float):
        self.value = _check_coef("init_coef", init_coef)
        if not float(target) > 0 or not math.isfinite(float(target)):
            raise AlgoError(f"target: must be a finite number > 0, got {target!r}")
        if not float(horizon) > 0:
            raise AlgoError(f"horizon: must be > 0, got {horizon!r}")
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_samples: int) -> None:
        current_kl = float(current_kl)
        if not math.isfinite(current_kl):
            raise AlgoError(f"current_kl: must be finite, got {current_kl!r}")
        if n_samples < 0:
            raise AlgoError(f"n_samples: must be >= 0, got {n_samples!r}")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_samples / self.horizon
