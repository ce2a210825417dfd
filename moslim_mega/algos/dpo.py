"""Online DPO (Guo et al. 2024): pick a (chosen, rejected) pair among each prompt's K samples by
reward, then apply the DPO (Rafailov et al. 2023) or IPO (Azar et al. 2023) loss.

Legend: B batch (prompts, or pairs in the loss), K samples per prompt. Log-probs given to
:func:`dpo_loss` are SEQUENCE log-probs: sums of token log-probs over the response.

Public API: :func:`select_pairs`, :func:`dpo_loss`, :data:`DPO_KINDS`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .core import AlgoError, check_same_shape

__all__ = ["DPO_KINDS", "select_pairs", "dpo_loss"]

DPO_KINDS = ("sigmoid", "ipo")


def select_pairs(rewards_BK: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per prompt: (index of the highest reward, index of the lowest reward, valid).

    valid is False when all K rewards are equal — there is no preference to learn, and the trainer
    must drop the pair rather than push two identical-reward samples apart. Among tied maxima
    (minima) the first index is taken.
    """
    if rewards_BK.dim() != 2:
        raise AlgoError(f"rewards_BK: expected shape [B, K], got {tuple(rewards_BK.shape)}")
    if rewards_BK.shape[1] < 2:
        raise AlgoError(f"rewards_BK: online DPO needs samples_per_prompt >= 2, got K={rewards_BK.shape[1]}")
    if not bool(torch.isfinite(rewards_BK).all()):
        raise AlgoError("rewards_BK: contains NaN or Inf")
    max_B, chosen_B = rewards_BK.max(dim=1)
    min_B, rejected_B = rewards_BK.min(dim=1)
    return chosen_B, rejected_B, max_B > min_B


def dpo_loss(
    pi_chosen_B: Tensor,
    pi_rejected_B: Tensor,
    ref_chosen_B: Tensor,
    ref_rejected_B: Tensor,
    beta: float,
    kind: str = "sigmoid",
) -> tuple[Tensor, dict[str, float]]:
    """With h = (π_c − ref_c) − (π_r − ref_r) (difference of sequence log-ratios):

    sigmoid (DPO): −log σ(β·h), averaged over pairs.
    ipo (IPO, Azar et al. Eq. 17): (h − 1/(2β))², averaged; β is IPO's τ. Departure from some
    implementations (TRL) that use length-averaged log-probs for IPO: we use sums, as the paper does.

    Stats: reward_margin = mean β·h, reward_accuracy = fraction h > 0, chosen_reward / rejected_reward
    = mean implicit rewards β·(π − ref).
    """
    check_same_shape(
        pi_chosen_B=pi_chosen_B, pi_rejected_B=pi_rejected_B, ref_chosen_B=ref_chosen_B, ref_rejected_B=ref_rejected_B
    )
    if not float(beta) > 0:
        raise AlgoError(f"beta: must be > 0, got {beta!r}")
    chosen_logratio_B = pi_chosen_B - ref_chosen_B
    rejected_logratio_B = pi_rejected_B - ref_rejected_B
    margin_B = chosen_logratio_B - rejected_logratio_B
    if kind == "sigmoid":
        # logsigmoid is the stable form of log σ for large |β·h|.
        loss = -F.logsigmoid(beta * margin_B).mean()
    elif kind == "ipo":
        loss = ((margin_B - 1.0 / (2.0 * beta)) ** 2).mean()
    else:
        raise AlgoError(f"kind: unknown DPO loss {kind!r}; expected one of {DPO_KINDS}")
    with torch.no_grad():
        stats = {
            "reward_margin": float((beta * margin_B).float().mean()),
            "reward_accuracy": float((margin_B > 0).float().mean()),
            "chosen_reward": float((beta * chosen_logratio_B).float().mean()),
            "rejected_reward": float((beta * rejected_logratio_B).float().mean()),
        }
    return loss, stats
