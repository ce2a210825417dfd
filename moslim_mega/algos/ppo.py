"""PPO pieces for Eq. 12: per-token rewards, GAE, clipped policy and value losses, entropy bonus.

Legend: B batch (sequences), T tokens (prompt + response columns). ``mask_BT`` is 1 on the
response tokens that are trained on: one contiguous run per row, which may start after some prompt
columns (0) and end before right padding (0).

Public API: :func:`token_level_rewards`, :func:`gae_advantages`, :func:`ppo_policy_loss`,
:func:`ppo_value_loss`, :func:`entropy_bonus`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .core import AlgoError, check_same_shape, masked_mean

__all__ = ["token_level_rewards", "gae_advantages", "ppo_policy_loss", "ppo_value_loss", "entropy_bonus"]


def _last_valid_index_B(mask_BT: Tensor) -> Tensor:
    """Column of the last mask≠0 entry of each row; raises if a row has none."""
    valid_BT = mask_BT != 0
    has_any_B = valid_BT.any(dim=1)
    if not bool(has_any_B.all()):
        rows = torch.nonzero(~has_any_B).flatten().tolist()
        raise AlgoError(f"mask_BT: rows {rows} have no valid (mask=1) token to carry the score")
    cols_T = torch.arange(mask_BT.shape[1], device=mask_BT.device)
    return torch.where(valid_BT, cols_T, -1).amax(dim=1)


def token_level_rewards(score_B: Tensor, kl_BT: Tensor, mask_BT: Tensor, kl_coef: float) -> Tensor:
    """Eq. 12 as per-token rewards (InstructGPT / verl): r_t = −β·kl_t on every response token, plus
    the sequence score r_θ(x, y) on the last response token. Outside the mask → 0.

    Splitting the sequence-level objective this way lets GAE credit the KL cost to the token that
    incurred it while the score arrives once, at the end of the response.
    """
    check_same_shape(kl_BT=kl_BT, mask_BT=mask_BT)
    if score_B.shape != (kl_BT.shape[0],):
        raise AlgoError(f"score_B: expected shape ({kl_BT.shape[0]},), got {tuple(score_B.shape)}")
    valid_BT = mask_BT != 0
    rewards_BT = torch.where(valid_BT, -kl_coef * kl_BT, torch.zeros((), dtype=kl_BT.dtype, device=kl_BT.device))
    last_B = _last_valid_index_B(mask_BT)
    rows_B = torch.arange(kl_BT.shape[0], device=kl_BT.device)
    rewards_BT = rewards_BT.clone()
    rewards_BT[rows_B, last_B] += score_B.to(rewards_BT.dtype)
    return rewards_BT


@torch.no_grad()
def gae_advantages(
    rewards_BT: Tensor, values_BT: Tensor, mask_BT: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over the masked positions.

    δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t and A_t = δ_t + γλ·m_{t+1}·A_{t+1}: the value after the last
    response token is 0 (the episode ends there), and a masked column cuts the recursion, so prompt
    and padding columns neither receive nor pass on advantage. Returns (adv_BT, returns_BT) with
    returns = adv + values, both 0 outside the mask. No gradient: these are regression targets.
    """
    check_same_shape(rewards_BT=rewards_BT, values_BT=values_BT, mask_BT=mask_BT)
    valid_BT = mask_BT != 0
    zero = torch.zeros((), dtype=values_BT.dtype, device=values_BT.device)
    # Zero the masked entries first so NaN/garbage in padded columns cannot leak through 0·x.
    r_BT = torch.where(valid_BT, rewards_BT.to(values_BT.dtype), zero)
    v_BT = torch.where(valid_BT, values_BT, zero)
    m_BT = valid_BT.to(values_BT.dtype)
    num_tokens = rewards_BT.shape[1]
    adv_BT = torch.zeros_like(v_BT)
    next_adv_B = torch.zeros_like(v_BT[:, 0])
    next_value_B = torch.zeros_like(v_BT[:, 0])
    next_mask_B = torch.zeros_like(v_BT[:, 0])
    for t in reversed(range(num_tokens)):
        delta_B = r_BT[:, t] + gamma * next_value_B * next_mask_B - v_BT[:, t]
        adv_B = (delta_B + gamma * lam * next_mask_B * next_adv_B) * m_BT[:, t]
        adv_BT[:, t] = adv_B
        next_adv_B, next_value_B, next_mask_B = adv_B, v_BT[:, t], m_BT[:, t]
    return adv_BT, adv_BT + v_BT


def _check_clip(name: str, clip_range: float, allow_zero: bool) -> float:
    clip_range = float(clip_range)
    if math.isnan(clip_range) or clip_range < 0 or (clip_range == 0 and not allow_zero):
        raise AlgoError(f"{name}: must be {'>=' if allow_zero else '>'} 0 (inf disables clipping), got {clip_range!r}")
    return clip_range


def ppo_policy_loss(
    logp_BT: Tensor, old_logp_BT: Tensor, adv_BT: Tensor, mask_BT: Tensor, clip_range: float,
    is_weight_BT: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clipped surrogate of PPO (Schulman et al. 2017, Eq. 7), negated to a loss:
    −min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) with ρ = exp(logp − old_logp), averaged over all masked tokens
    of the batch (token-mean, so long responses weigh more — verl's default "token-mean").

    With ε = inf the clip is the identity and the loss is exactly −ρ·A, whose gradient at ρ = 1 is
    the REINFORCE gradient −A·∇logp. Stats: clipfrac (fraction of tokens where the clipped branch is
    active), approx_kl = mean ½(logp − old)², ratio_mean.

    ``is_weight_BT`` (no gradient): the rollout-correction weights of algos/rollout_correction.py,
    multiplying each token's clipped-surrogate term (a departure from Eq. 7: the rollout engine's
    π_rollout, not π_old, sampled the tokens).
    """
    check_same_shape(logp_BT=logp_BT, old_logp_BT=old_logp_BT, adv_BT=adv_BT, mask_BT=mask_BT)
    eps = _check_clip("clip_range", clip_range, allow_zero=False)
    log_ratio_BT = logp_BT - old_logp_BT
    ratio_BT = torch.exp(log_ratio_BT)
    loss_unclipped_BT = -adv_BT * ratio_BT
    loss_clipped_BT = -adv_BT * torch.clamp(ratio_BT, 1.0 - eps, 1.0 + eps)
    per_token_BT = torch.maximum(loss_unclipped_BT, loss_clipped_BT)
    if is_weight_BT is not None:
        check_same_shape(is_weight_BT=is_weight_BT, mask_BT=mask_BT)
        per_token_BT = per_token_BT * is_weight_BT.detach()
    loss = masked_mean(per_token_BT, mask_BT)
    with torch.no_grad():
        stats = {
            "clipfrac": float(masked_mean((loss_clipped_BT > loss_unclipped_BT).float(), mask_BT)),
            "approx_kl": float(masked_mean(0.5 * log_ratio_BT.float() ** 2, mask_BT)),
            "ratio_mean": float(masked_mean(ratio_BT.float(), mask_BT)),
        }
    return loss, stats


def ppo_value_loss(
    values_BT: Tensor, old_values_BT: Tensor, returns_BT: Tensor, mask_BT: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, float]]:
    """½·max((v − R)², (clip(v, v_old − ε, v_old + ε) − R)²), token-mean over the mask (the
    pessimistic clipped value loss of OpenAI baselines / InstructGPT). ε = 0 or inf → plain ½(v − R)².
    Stats: vf_clipfrac (fraction of tokens where the clipped branch is the larger one)."""
    check_same_shape(values_BT=values_BT, old_values_BT=old_values_BT, returns_BT=returns_BT, mask_BT=mask_BT)
    eps = _check_clip("clip_range", clip_range, allow_zero=True)
    sq_err_BT = (values_BT - returns_BT) ** 2
    if eps == 0 or math.isinf(eps):
        return 0.5 * masked_mean(sq_err_BT, mask_BT), {"vf_clipfrac": 0.0}
    clipped_BT = old_values_BT + torch.clamp(values_BT - old_values_BT, -eps, eps)
    sq_err_clipped_BT = (clipped_BT - returns_BT) ** 2
    loss = 0.5 * masked_mean(torch.maximum(sq_err_BT, sq_err_clipped_BT), mask_BT)
    with torch.no_grad():
        vf_clipfrac = float(masked_mean((sq_err_clipped_BT > sq_err_BT).float(), mask_BT))
    return loss, {"vf_clipfrac": vf_clipfrac}


def entropy_bonus(entropy_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """Token-mean policy entropy over the mask; the trainer subtracts coef × this from the loss."""
    check_same_shape(entropy_BT=entropy_BT, mask_BT=mask_BT)
    return masked_mean(entropy_BT, mask_BT)
