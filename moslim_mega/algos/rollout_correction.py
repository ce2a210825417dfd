"""Rollout/trainer mismatch: how far the rollout engine's sampling log-probs are from the trainer's,
and the truncated importance weights that correct the policy gradient for it.

Legend: B batch (sequences), T tokens. ``trainer_logp_BT`` / ``old_logp_BT``: the trainer's log-probs
of the sampled tokens before the update (π_old, temperature-scaled full softmax); ``rollout_logp_BT``:
the engine's log-probs of the same tokens (π_rollout, the distribution they were drawn from).
``mask_BT`` is 1 on the response tokens.

Departure from the paper: MOSLIM's objective (Eq. 12) assumes the responses are sampled from the
policy being trained. A separate rollout engine (another kernel, precision or a stale copy) samples
from π_rollout ≠ π_old, which biases the gradient. The truncated importance sampling (TIS) weight
min(π_old / π_rollout, C) of Yao et al. (2025, "Your efficient RL framework secretly brings you
off-policy RL training"; verl's rollout correction) multiplies the per-token policy-gradient terms
of PPO's clipped surrogate (Schulman et al. 2017, Eq. 7 — also used by our RLOO), nothing else:
KL and entropy terms and the critic are unweighted, as in verl.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .core import AlgoError, check_same_shape, masked_mean

TIS_MODES = ("none", "token_tis", "seq_tis")


def logprob_mismatch(trainer_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor) -> dict[str, Tensor]:
    """The stale-weight guard's statistics over the masked tokens (0-d float64 tensors):

    * ``abs_diff_mean`` / ``abs_diff_max``: mean / max of |trainer − rollout| log-prob;
    * ``mismatch_kl``: the k3 estimator (Schulman 2020) of KL(π_rollout ‖ π_trainer) on tokens
      drawn from π_rollout: mean of exp(d) − 1 − d with d = trainer − rollout (≥ 0, unbiased,
      low variance; 0 exactly when the log-probs agree).
    """
    check_same_shape(trainer_logp_BT=trainer_logp_BT, rollout_logp_BT=rollout_logp_BT, mask_BT=mask_BT)
    valid_BT = mask_BT != 0
    if not bool(valid_BT.any()):
        raise AlgoError("mask_BT: no response token to compare")
    d_N = (trainer_logp_BT.double() - rollout_logp_BT.double())[valid_BT]
    return {"abs_diff_mean": d_N.abs().mean(), "abs_diff_max": d_N.abs().max(),
            "mismatch_kl": (torch.expm1(d_N) - d_N).mean()}


def _check_cap(cap: float) -> float:
    cap = float(cap)
    if math.isnan(cap) or cap <= 0:
        raise AlgoError(f"policy.rollout_correction_cap: must be > 0, got {cap!r}")
    return cap


def token_tis_weights_BT(old_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor,
                         cap: float) -> tuple[Tensor, dict]:
    """Per-token w_t = min(π_old(y_t) / π_rollout(y_t), C), 0 outside the mask (computed in log
    space: exp(min(log ratio, log C)), so no overflow). Stats over the masked tokens:
    ``tis_weight_mean`` (after the cap) and ``tis_capped_frac`` (ratio > C)."""
    check_same_shape(old_logp_BT=old_logp_BT, rollout_logp_BT=rollout_logp_BT, mask_BT=mask_BT)
    log_cap = math.log(_check_cap(cap))
    log_ratio_BT = (old_logp_BT - rollout_logp_BT).float()
    valid_BT = mask_BT != 0
    w_BT = torch.where(valid_BT, torch.exp(log_ratio_BT.clamp(max=log_cap)), torch.zeros_like(log_ratio_BT))
    stats = {"tis_weight_mean": float(masked_mean(w_BT, mask_BT)),
             "tis_capped_frac": float(masked_mean((log_ratio_BT > log_cap).float(), mask_BT))}
    return w_BT.detach(), stats


def seq_tis_weights_B(old_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor, cap: float) -> tuple[Tensor, dict]:
    """Per-sequence w = min(Π_t π_old(y_t) / π_rollout(y_t), C) over the response tokens (the
    product is a sum of log ratios, capped in log space). Stats over the sequences."""
    check_same_shape(old_logp_BT=old_logp_BT, rollout_logp_BT=rollout_logp_BT, mask_BT=mask_BT)
    log_cap = math.log(_check_cap(cap))
    valid_BT = mask_BT != 0
    zero = torch.zeros((), device=mask_BT.device)
    log_ratio_B = torch.where(valid_BT, (old_logp_BT - rollout_logp_BT).float(), zero).sum(1)
    w_B = torch.exp(log_ratio_B.clamp(max=log_cap))
    stats = {"tis_weight_mean": float(w_B.mean()), "tis_capped_frac": float((log_ratio_B > log_cap).float().mean())}
    return w_B.detach(), stats


def tis_weights_BT(mode: str, old_logp_BT: Tensor, rollout_logp_BT: Tensor, mask_BT: Tensor,
                   cap: float) -> tuple[Tensor | None, dict]:
    """``policy.rollout_correction``'s per-token weights of the policy-gradient terms (None for
    ``none``); ``seq_tis`` broadcasts each sequence's weight over its response tokens."""
    if mode == "none":
        return None, {}
    if mode == "token_tis":
        return token_tis_weights_BT(old_logp_BT, rollout_logp_BT, mask_BT, cap)
    if mode == "seq_tis":
        w_B, stats = seq_tis_weights_B(old_logp_BT, rollout_logp_BT, mask_BT, cap)
        return w_B[:, None] * (mask_BT != 0).float(), stats
    raise AlgoError(f"policy.rollout_correction: {mode!r} is not one of {', '.join(TIS_MODES)}")
