"""Reward-model evaluation metrics: pure functions on tensors, results as plain python numbers.

Labels are class indices; −1 marks an unlabelled example, which every metric ignores.
Pairwise metrics compare examples within a group (e.g. responses to the same prompt).

Public API: :func:`expected_class`, :func:`intensity_accuracy`, :func:`majority_rate`,
:func:`confusion_matrix`, :func:`pairwise_accuracy`, :func:`mapping_accuracy`,
:func:`head_report`, :func:`rm_report`, :class:`MetricError`.
"""

# Shapes: N examples, K classes of a head, H heads.

from __future__ import annotations

import math
from typing import Hashable, Sequence

import torch
from torch import Tensor

__all__ = [
    "MetricError",
    "expected_class",
    "intensity_accuracy",
    "majority_rate",
    "confusion_matrix",
    "pairwise_accuracy",
    "mapping_accuracy",
    "head_report",
    "rm_report",
]

SCALAR_METRICS = ("intensity_accuracy", "majority_rate", "pairwise_accuracy", "mapping_accuracy")


class MetricError(ValueError):
    """Inconsistent inputs to a metric; the message names the field."""


def _check_len(name: str, n: int, expected: int) -> None:
    if n != expected:
        raise MetricError(f"{name}: length {n} != {expected} examples")


def expected_class(probs_NK: Tensor) -> Tensor:
    """Σ_c c·p[c] per example, ``[N]`` float32: a score that orders examples by intensity."""
    classes_K = torch.arange(probs_NK.shape[-1], device=probs_NK.device, dtype=torch.float32)
    return (probs_NK.float() * classes_K).sum(-1)


def intensity_accuracy(pred_N: Tensor, labels_N: Tensor) -> float:
    """Exact class match over labelled examples (nan if none are labelled)."""
    _check_len("pred_N", pred_N.numel(), labels_N.numel())
    mask_N = labels_N >= 0
    n = int(mask_N.sum())
    if n == 0:
        return float("nan")
    return float((pred_N.masked_select(mask_N) == labels_N.masked_select(mask_N)).sum()) / n


def majority_rate(labels_N: Tensor) -> float:
    """Frequency of the most common label among labelled examples: the constant-guess baseline."""
    lab_N = labels_N.masked_select(labels_N >= 0).long()
    if lab_N.numel() == 0:
        return float("nan")
    return float(torch.bincount(lab_N).max()) / lab_N.numel()


def confusion_matrix(pred_N: Tensor, labels_N: Tensor, num_classes: int) -> list[list[int]]:
    """``[K][K]`` counts over labelled examples: rows = true class, columns = predicted class."""
    _check_len("pred_N", pred_N.numel(), labels_N.numel())
    mask_N = labels_N >= 0
    true_M, pred_M = labels_N.masked_select(mask_N).long().cpu(), pred_N.masked_select(mask_N).long().cpu()
    if bool((true_M >= num_classes).any()):
        raise MetricError(f"labels_N: label ≥ num_classes={num_classes}")
    if bool(((pred_M < 0) | (pred_M >= num_classes)).any()):
        raise MetricError(f"pred_N: prediction outside [0, {num_classes})")
    flat = torch.bincount(true_M * num_classes + pred_M, minlength=num_classes * num_classes)
    return flat.view(num_classes, num_classes).tolist()


def _take(x_N: Tensor, idx_P: Tensor) -> Tensor:
    # index_select / masked_select instead of x[idx] / x[mask]: CPU advanced indexing takes a
    # generic path that measured ~100x slower at N=10k (2 threads), and evals run it often.
    return x_N.index_select(0, idx_P)


def _differing_pairs(labels_N: Tensor, groups: Sequence[Hashable]) -> tuple[Tensor, Tensor]:
    """Index tensors (a_P, b_P) of all unordered same-group pairs of labelled examples whose
    labels differ.

    Sort by group id, then compare each position with the one ``d`` places later, for
    d = 1 .. largest group − 1: O(N · largest group) work in a handful of vectorised steps,
    rather than a python loop over thousands of small groups.
    """
    _check_len("groups", len(groups), labels_N.numel())
    ids: dict[Hashable, int] = {}
    gid_N = torch.tensor([ids.setdefault(g, len(ids)) for g in groups], dtype=torch.long)
    keep_M = torch.nonzero(labels_N >= 0).squeeze(1)
    empty = torch.zeros(0, dtype=torch.long)
    if keep_M.numel() < 2:
        return empty, empty
    gid_M = _take(gid_N, keep_M)
    order_M = torch.argsort(gid_M, stable=True)
    idx_M, gid_M = _take(keep_M, order_M), _take(gid_M, order_M)
    lab_M = _take(labels_N, idx_M)
    largest = int(torch.bincount(gid_M).max())
    a_parts, b_parts = [empty], [empty]
    for d in range(1, largest):
        ok_P = (gid_M[:-d] == gid_M[d:]) & (lab_M[:-d] != lab_M[d:])
        a_parts.append(idx_M[:-d].masked_select(ok_P))
        b_parts.append(idx_M[d:].masked_select(ok_P))
    return torch.cat(a_parts), torch.cat(b_parts)


def _ordered_score(x_P: Tensor, y_P: Tensor) -> float:
    """Σ over pairs of 1 where x > y, 0.5 on a tie, 0 where x < y."""
    return float((x_P > y_P).sum()) + 0.5 * float((x_P == y_P).sum())


def pairwise_accuracy(scores_N: Tensor, labels_N: Tensor, groups: Sequence[Hashable]) -> tuple[float, int]:
    """Fraction of same-group pairs with different labels that the scores order like the labels.

    A tie in scores counts 0.5. Returns (accuracy, number of pairs); accuracy is nan with 0 pairs.
    """
    _check_len("scores_N", scores_N.numel(), labels_N.numel())
    scores_N, labels_N = scores_N.detach().cpu().double().reshape(-1), labels_N.cpu().reshape(-1)
    a_P, b_P = _differing_pairs(labels_N, groups)
    num_pairs = int(a_P.numel())
    if num_pairs == 0:
        return float("nan"), 0
    # orient each pair so that a has the higher label; then a correct score has s_a > s_b
    swap_P = _take(labels_N, a_P) < _take(labels_N, b_P)
    hi_P, lo_P = torch.where(swap_P, b_P, a_P), torch.where(swap_P, a_P, b_P)
    return _ordered_score(_take(scores_N, hi_P), _take(scores_N, lo_P)) / num_pairs, num_pairs


def mapping_accuracy(rewards_NK: Tensor, labels_N: Tensor, groups: Sequence[Hashable]) -> tuple[float, int]:
    """Does the mapped reward for target t rank the example labelled t above one labelled ≠ t?

    ``rewards_NK[n, t]`` is example n's mapped reward when the prompt asks for class t. Every
    same-group pair with labels (u, v), u ≠ v, gives two ordered comparisons: target u (a should
    beat b) and target v (b should beat a). Tie 0.5. Returns (accuracy, number of comparisons).
    """
    _check_len("rewards_NK", rewards_NK.shape[0], labels_N.numel())
    rewards_NK, labels_N = rewards_NK.detach().cpu().double(), labels_N.cpu().long().reshape(-1)
    num_k = rewards_NK.shape[1]
    if bool((labels_N >= num_k).any()):
        raise MetricError(f"labels_N: label ≥ number of reward columns {num_k}")
    a_P, b_P = _differing_pairs(labels_N, groups)
    if a_P.numel() == 0:
        return float("nan"), 0
    flat = rewards_NK.reshape(-1)
    la_P, lb_P = _take(labels_N, a_P), _take(labels_N, b_P)
    correct = _ordered_score(_take(flat, a_P * num_k + la_P), _take(flat, b_P * num_k + la_P))
    correct += _ordered_score(_take(flat, b_P * num_k + lb_P), _take(flat, a_P * num_k + lb_P))
    num_pairs = 2 * int(a_P.numel())
    return correct / num_pairs, num_pairs


def head_report(
    probs_NK: Tensor, labels_N: Tensor, groups: Sequence[Hashable], rewards_NK: Tensor | None = None
) -> dict:
    """All metrics of one head as a JSON-serialisable dict."""
    _check_len("probs_NK", probs_NK.shape[0], labels_N.numel())
    probs_NK, labels_N = probs_NK.detach().cpu(), labels_N.cpu()
    pred_N = probs_NK.argmax(-1)
    pair_acc, num_pairs = pairwise_accuracy(expected_class(probs_NK), labels_N, groups)
    report = {
        "intensity_accuracy": intensity_accuracy(pred_N, labels_N),
        "majority_rate": majority_rate(labels_N),
        "pairwise_accuracy": pair_acc,
        "num_pairs": num_pairs,
        "confusion": confusion_matrix(pred_N, labels_N, probs_NK.shape[-1]),
        "num_labelled": int((labels_N >= 0).sum()),
    }
    if rewards_NK is not None:
        report["mapping_accuracy"] = mapping_accuracy(rewards_NK, labels_N, groups)[0]
    return report


def rm_report(
    probs: Sequence[Tensor],
    labels_NH: Tensor,
    groups: Sequence[Hashable],
    names: Sequence[str],
    rewards: Sequence[Tensor] | None = None,
) -> dict:
    """``{"heads": {name: head_report}, "mean": {metric: nan-ignoring mean over heads}}``."""
    num_heads = len(names)
    if len(probs) != num_heads:
        raise MetricError(f"probs: {len(probs)} heads but {num_heads} names")
    if labels_NH.dim() != 2 or labels_NH.shape[1] != num_heads:
        raise MetricError(f"labels_NH: expected shape [N, {num_heads}], got {tuple(labels_NH.shape)}")
    if rewards is not None and len(rewards) != num_heads:
        raise MetricError(f"rewards: {len(rewards)} heads but {num_heads} names")
    heads = {
        name: head_report(probs[i], labels_NH[:, i], groups, None if rewards is None else rewards[i])
        for i, name in enumerate(names)
    }
    mean = {}
    for metric in SCALAR_METRICS:
        values = [h[metric] for h in heads.values() if metric in h and not math.isnan(h[metric])]
        if any(metric in h for h in heads.values()):
            mean[metric] = sum(values) / len(values) if values else float("nan")
    return {"heads": heads, "mean": mean}
