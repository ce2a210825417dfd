"""RLOO (Ahmadian et al. 2024): REINFORCE with a leave-one-out baseline over K samples per prompt.

Legend: B batch (sequences, or prompts in ``rewards_BK``), K samples per prompt, T tokens.

Public API: :func:`rloo_advantages`, :func:`sequence_kl_rewards`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .core import AlgoError, check_same_shape, masked_sum

__all__ = ["rloo_advantages", "sequence_kl_rewards"]


def rloo_advantages(rewards_BK: Tensor) -> Tensor:
    """A_i = r_i − mean_{j≠i} r_j over the K samples of each prompt (row).

    The baseline excludes the sample itself, so it is independent of that sample and the estimator
    stays unbiased; algebraically A_i = K/(K−1)·(r_i − mean_j r_j), but the direct form is kept
    because it is the one in the paper and rounds no worse.
    """
    if rewards_BK.dim() != 2:
        raise AlgoError(f"rewards_BK: expected shape [B, K], got {tuple(rewards_BK.shape)}")
    num_samples = rewards_BK.shape[1]
    if num_samples < 2:
        raise AlgoError(f"rewards_BK: RLOO needs samples_per_prompt >= 2 (K >= 2), got K={num_samples}")
    others_mean_BK = (rewards_BK.sum(dim=1, keepdim=True) - rewards_BK) / (num_samples - 1)
    return rewards_BK - others_mean_BK


def sequence_kl_rewards(score_B: Tensor, kl_BT: Tensor, mask_BT: Tensor, kl_coef: float) -> Tensor:
    """Eq. 12 at sequence level: score − β·Σ_t kl_t over the response tokens.

    RLOO treats the whole response as one action, so the KL penalty is folded into the single
    sequence reward instead of being spread over tokens as PPO does.
    """
    check_same_shape(kl_BT=kl_BT, mask_BT=mask_BT)
    if score_B.shape != (kl_BT.shape[0],):
        raise AlgoError(f"score_B: expected shape ({kl_BT.shape[0]},), got {tuple(score_B.shape)}")
    return score_B - kl_coef * masked_sum(kl_BT, mask_BT, dim=-1).to(score_B.dtype)
