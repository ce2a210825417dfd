"""Reward-model losses (paper Eq. 6-10). Legend: B batch, H heads, K classes of one head.

Labels are class indices ``[B, H]`` with −1 where a head is unlabelled (e.g. UltraFeedback "N/A"
or a safety-only record): those entries contribute nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Eq. 6-9 is the fused multi-head kernel's reference, so it is defined beside that kernel.
from ..kernels.multihead_head import per_head_ce_loss

__all__ = ["balanced_class_weights", "paper_eq10_loss", "per_head_ce_loss"]


def paper_eq10_loss(logits: list[torch.Tensor], labels_BH: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Eq. 10 taken literally: one K-way distribution pooled over heads,
    q_j = Σ_i exp(z_{i,j}) / Σ_i Σ_k exp(z_{i,k}), and loss −Σ_i log q_{y_i}.

    Departure from Eq. 6-9 (why it is only an ablation): the heads share one normaliser, so head
    i's label only constrains the pooled distribution — a head can "win" class j for another head
    and the per-head probabilities that Eq. 11 needs are not what is trained. Heads with fewer
    classes are padded with −inf (they cannot put mass on classes they do not have).
    """
    B = labels_BH.shape[0]
    k_max = max(x.shape[1] for x in logits)
    padded_HBK = torch.stack([F.pad(x.float(), (0, k_max - x.shape[1]), value=float("-inf")) for x in logits])
    log_norm_B1 = torch.logsumexp(padded_HBK.permute(1, 0, 2).reshape(B, -1), dim=1, keepdim=True)
    log_q_BK = torch.logsumexp(padded_HBK, dim=0) - log_norm_B1
    per_head = []
    for i in range(len(logits)):
        labels_B = labels_BH[:, i]
        mask_B = labels_B >= 0
        nll_B = -log_q_BK.gather(1, labels_B.clamp(min=0)[:, None])[:, 0]
        per_head.append(torch.where(mask_B, nll_B, 0.0).sum() / B)
    return torch.stack(per_head).sum(), per_head


def balanced_class_weights(labels_NH: torch.Tensor, num_classes: tuple[int, ...]) -> list[torch.Tensor]:
    """Inverse-frequency weights N / (K · count_c) per head; unseen classes get weight 1."""
    weights = []
    for i, k in enumerate(num_classes):
        labels_N = labels_NH[:, i]
        labels_N = labels_N[labels_N >= 0]
        counts_K = torch.bincount(labels_N, minlength=k).float()
        w_K = torch.where(counts_K > 0, labels_N.numel() / (k * counts_K.clamp(min=1)), torch.ones_like(counts_K))
        weights.append(w_K)
    return weights
