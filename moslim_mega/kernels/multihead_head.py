"""Fused multi-head reward head (issue 7): linear → per-head log-softmax → masked cross-entropy
(training) or → probabilities → Eq. 11 reward mapping (inference), each in one kernel pass.

Legend: B batch, D hidden size, NH heads, K_i classes of head i, C = ΣK_i (all classes of all
heads). Weight layout is the reward model's own ``nn.Linear(D, C)``: ``weight_CD``, ``bias_C``
(see :class:`moslim_mega.reward.model.MultiHeadRewardModel`).

Why fuse: C is tiny (12 for K = 5, 5, 2) while D is large, so the head is bound by reading
hidden_BD once; eager PyTorch adds a dozen small launches (split, log-softmax and CE per head,
masking, stacking). Here one program owns BLOCK_B rows: it accumulates z_BC = h·Wᵀ + b over D
tiles, then does every head's log-softmax in registers, using a per-column head id
(``col_head``) and class index within its head (``col_local``) instead of ragged splits.

Semantics are the repo's, exactly:
- loss: :func:`per_head_ce_loss` (defined here, beside the kernel; :mod:`moslim_mega.reward.losses`
  re-exports it) — Σ_i of head i's (class-weighted) mean CE over its labelled rows (label −1 =
  unlabelled); a head with no label gives 0.
- reward: :class:`moslim_mega.reward.mapping.RewardMapper`'s — kinds zscore (Eq. 11), logprob,
  neg_abs_dist; normalize_by all / named; clip. Target −1 = head not named (mask 0). The kernel
  takes the mapping as plain values (per-class mean and std, the std already floored, kind,
  normalisation, clip); ``RewardMapper.head_rewards`` passes its own.

This module imports nothing of the package beyond :mod:`.dispatch`: kernels are leaves.

Public API: :func:`fused_multihead_head`, :func:`fused_multihead_reward`, :func:`per_head_ce_loss`,
:func:`multihead_head_loss_reference`, :func:`multihead_reward_reference`, :data:`REWARD_KINDS`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dispatch import KernelError, resolve_impl

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference path needs only torch
    triton = None

__all__ = [
    "FusedMultiheadHeadLoss",
    "REWARD_KINDS",
    "REWARD_NORMALIZE_BY",
    "fused_multihead_head",
    "fused_multihead_reward",
    "multihead_head_loss_reference",
    "multihead_reward_reference",
    "per_head_ce_loss",
]

BLOCK_B, BLOCK_D = 32, 64
REWARD_KINDS = ("zscore", "logprob", "neg_abs_dist")  # KIND in the kernel is the index here
REWARD_NORMALIZE_BY = ("all", "named")

if triton is not None:

    @triton.jit
    def _head_logits(h_ptr, stride_hb, w_ptr, stride_wc, b_ptr, rows, cols, B, D, C,
                     BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr):
        """z[BLOCK_B, BLOCK_C] = h·Wᵀ + b in fp32, accumulated over D tiles."""
        acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + tl.arange(0, BLOCK_D)
            dmask = ds < D
            h = tl.load(h_ptr + rows[:, None] * stride_hb + ds[None, :], mask=(rows < B)[:, None] & dmask[None, :],
                        other=0.0)
            w = tl.load(w_ptr + cols[None, :] * stride_wc + ds[:, None], mask=dmask[:, None] & (cols < C)[None, :],
                        other=0.0)
            if IEEE:  # fp32 inputs: no TF32 rounding, so fp32 results match the reference ~1e-6
                acc += tl.dot(h, w, input_precision="ieee")
            else:
                acc += tl.dot(h, w)
        return acc + tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]

    @triton.jit
    def _per_head_log_softmax(z, head, NUM_HEADS):
        """log-softmax of z within each head's columns; padding columns (head −1) give 0."""
        lse = z * 0.0
        for hh in range(0, NUM_HEADS):
            in_h = (head == hh)[None, :]
            mx = tl.max(tl.where(in_h, z, float("-inf")), axis=1)
            ssum = tl.sum(tl.where(in_h, tl.exp(z - mx[:, None]), 0.0), axis=1)
            lse = tl.where(in_h, (mx + tl.log(ssum))[:, None], lse)
        return tl.where((head >= 0)[None, :], z - lse, 0.0)

    @triton.jit
    def _head_fwd_kernel(
        h_ptr, stride_hb, w_ptr, stride_wc, b_ptr, col_head_ptr, col_local_ptr, cw_ptr,
        y_ptr, stride_yb, logp_ptr, num_ptr, den_ptr, mean_ptr, std_ptr, reward_ptr,
        B, D, C, NUM_HEADS, clip,
        MODE: tl.constexpr, KIND: tl.constexpr, NORM_ALL: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr,
    ):
        # MODE 0: y = labels → per-column CE partial sums; MODE 1: y = targets → rewards.
        pid = tl.program_id(0)
        rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = tl.arange(0, BLOCK_C)
        rmask, cmask = rows < B, cols < C
        valid = rmask[:, None] & cmask[None, :]
        z = _head_logits(h_ptr, stride_hb, w_ptr, stride_wc, b_ptr, rows, cols, B, D, C,
                         BLOCK_B, BLOCK_D, BLOCK_C, IEEE)
        head = tl.load(col_head_ptr + cols, mask=cmask, other=-1)
        local = tl.load(col_local_ptr + cols, mask=cmask, other=-1)
        logp = _per_head_log_softmax(z, head, NUM_HEADS)
        tl.store(logp_ptr + rows[:, None] * BLOCK_C + cols[None, :], logp, mask=valid)
        # y of each column's head, [BLOCK_B, BLOCK_C]; −1 = unlabelled / not named.
        y = tl.load(y_ptr + rows[:, None] * stride_yb + head[None, :], mask=valid, other=-1)
        onehot = (y == local[None, :]) & valid
        if MODE == 0:
            cw = tl.load(cw_ptr + cols, mask=cmask, other=0.0)
            num = tl.sum(tl.where(onehot, -logp * cw[None, :], 0.0), axis=0)
            den = tl.sum(tl.where(onehot, cw[None, :], 0.0), axis=0)
            tl.store(num_ptr + pid * BLOCK_C + cols, num)
            tl.store(den_ptr + pid * BLOCK_C + cols, den)
        else:
            p = tl.exp(logp)
            if KIND == 0:  # zscore, Eq. 11: (p[t] − avg[t]) / std[t]
                mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0)
                std = tl.load(std_ptr + cols, mask=cmask, other=1.0)
                term = tl.where(onehot, (p - mean[None, :]) / std[None, :], 0.0)
            elif KIND == 1:  # logprob: log p[t]
                term = tl.where(onehot, tl.log(tl.maximum(p, 1e-12)), 0.0)
            else:  # neg_abs_dist: −Σ_c p[c]·|c − t|
                dist = tl.abs(local[None, :] - y).to(tl.float32)
                term = tl.where(valid & (y >= 0), -p * dist, 0.0)
            total = tl.sum(term, axis=1)
            if NORM_ALL:
                reward = total / NUM_HEADS
            else:  # a row with no named head has total 0; max(k, 1) keeps it 0
                named = tl.sum(onehot.to(tl.float32), axis=1)
                reward = total / tl.maximum(named, 1.0)
            if clip > 0.0:
                reward = tl.minimum(tl.maximum(reward, -clip), clip)
            tl.store(reward_ptr + rows, reward, mask=rmask)

    @triton.jit
    def _head_grad_z(
        logp_ptr, y_ptr, stride_yb, cw_ptr, gtot_ptr, ghead_ptr, den_ptr, col_head_ptr, col_local_ptr,
        rows, cols, B, C, BLOCK_C: tl.constexpr,
    ):
        """dL/dz = scale_head · w[y] · (p − 1[c = y]) on labelled rows, else 0."""
        cmask = cols < C
        valid = (rows < B)[:, None] & cmask[None, :]
        head = tl.load(col_head_ptr + cols, mask=cmask, other=0)
        local = tl.load(col_local_ptr + cols, mask=cmask, other=0)
        y = tl.load(y_ptr + rows[:, None] * stride_yb + head[None, :], mask=valid, other=-1)
        labelled = valid & (y >= 0)
        w_y = tl.load(cw_ptr + (cols - local)[None, :] + y, mask=labelled, other=0.0)  # head start + label
        # d total / d loss_h = g_total + g_head[h]; loss_h = Σ w·nll / den_h (0 when den_h = 0)
        g = tl.load(gtot_ptr) + tl.load(ghead_ptr + head, mask=cmask, other=0.0)
        den = tl.load(den_ptr + head, mask=cmask, other=0.0)
        scale = tl.where(den > 0, g / tl.maximum(den, 1e-30), 0.0)
        p = tl.exp(tl.load(logp_ptr + rows[:, None] * BLOCK_C + cols[None, :], mask=valid, other=float("-inf")))
        dz = scale[None, :] * w_y * (p - tl.where(y == local[None, :], 1.0, 0.0))
        return tl.where(labelled, dz, 0.0)

    @triton.jit
    def _head_bwd_hidden_kernel(
        logp_ptr, y_ptr, stride_yb, cw_ptr, gtot_ptr, ghead_ptr, den_ptr, col_head_ptr, col_local_ptr,
        w_ptr, stride_wc, dh_ptr, stride_db, B, D, C,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cols = tl.arange(0, BLOCK_C)
        dz = _head_grad_z(
            logp_ptr, y_ptr, stride_yb, cw_ptr, gtot_ptr, ghead_ptr, den_ptr, col_head_ptr, col_local_ptr,
            rows, cols, B, C, BLOCK_C,
        )
        w = tl.load(w_ptr + cols[:, None] * stride_wc + ds[None, :], mask=(cols < C)[:, None] & (ds < D)[None, :],
                    other=0.0)
        if IEEE:
            dh = tl.dot(dz, w.to(tl.float32), input_precision="ieee")
        else:
            dh = tl.dot(dz.to(w.dtype), w)
        tl.store(dh_ptr + rows[:, None] * stride_db + ds[None, :], dh.to(dh_ptr.dtype.element_ty),
                 mask=(rows < B)[:, None] & (ds < D)[None, :])

    @triton.jit
    def _head_bwd_weight_kernel(
        logp_ptr, y_ptr, stride_yb, cw_ptr, gtot_ptr, ghead_ptr, den_ptr, col_head_ptr, col_local_ptr,
        h_ptr, stride_hb, dw_ptr, db_ptr, B, D, C,
        BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr, IEEE: tl.constexpr,
    ):
        # One program owns BLOCK_D columns of dW and walks all rows: deterministic, no atomics.
        pid = tl.program_id(0)
        ds = pid * BLOCK_D + tl.arange(0, BLOCK_D)
        cols = tl.arange(0, BLOCK_C)
        acc = tl.zeros((BLOCK_C, BLOCK_D), dtype=tl.float32)
        db = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + tl.arange(0, BLOCK_B)
            dz = _head_grad_z(
                logp_ptr, y_ptr, stride_yb, cw_ptr, gtot_ptr, ghead_ptr, den_ptr, col_head_ptr, col_local_ptr,
                rows, cols, B, C, BLOCK_C,
            )
            h = tl.load(h_ptr + rows[:, None] * stride_hb + ds[None, :], mask=(rows < B)[:, None] & (ds < D)[None, :],
                        other=0.0)
            if IEEE:
                acc += tl.dot(tl.trans(dz), h.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(tl.trans(dz.to(h.dtype)), h)
            db += tl.sum(dz, axis=0)
        tl.store(dw_ptr + cols[:, None] * D + ds[None, :], acc.to(dw_ptr.dtype.element_ty),
                 mask=(cols < C)[:, None] & (ds < D)[None, :])
        tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=cols < tl.where(pid == 0, C, 0))  # only program 0


    @triton.jit
    def _head_finalize_kernel(num_ptr, den_ptr, P, col_head_ptr, C, loss_ptr, total_ptr, den_out_ptr, NUM_HEADS,
                              BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Reduce the forward's per-program partial sums to per-head losses and their total in one
        launch: deterministic (no atomics) and no chain of tiny PyTorch ops."""
        cols = tl.arange(0, BLOCK_C)
        num = tl.zeros((BLOCK_C,), dtype=tl.float32)
        den = tl.zeros((BLOCK_C,), dtype=tl.float32)
        for p0 in range(0, P, BLOCK_P):
            ps = p0 + tl.arange(0, BLOCK_P)
            offs = ps[:, None] * BLOCK_C + cols[None, :]
            num += tl.sum(tl.load(num_ptr + offs, mask=(ps < P)[:, None], other=0.0), axis=0)
            den += tl.sum(tl.load(den_ptr + offs, mask=(ps < P)[:, None], other=0.0), axis=0)
        head = tl.load(col_head_ptr + cols, mask=cols < C, other=-1)
        total = tl.sum(num * 0.0, axis=0)  # an fp32 scalar tensor: a stable loop-carried type
        for hh in range(0, NUM_HEADS):
            num_h = tl.sum(tl.where(head == hh, num, 0.0), axis=0)
            den_h = tl.sum(tl.where(head == hh, den, 0.0), axis=0)
            loss_h = tl.where(den_h > 0, num_h / tl.maximum(den_h, 1e-30), 0.0)  # unlabelled head: 0
            tl.store(loss_ptr + hh, loss_h)
            tl.store(den_out_ptr + hh, den_h)
            total += loss_h
        tl.store(total_ptr, total)


@functools.lru_cache(maxsize=32)
def _layout(num_classes: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor, int]:
    """Per-column head id and class-within-head (cached: no host→device copy per call), and the
    padded column block (≥16 for tl.dot)."""
    head_C = torch.cat([torch.full((k,), i, dtype=torch.int32) for i, k in enumerate(num_classes)])
    local_C = torch.cat([torch.arange(k, dtype=torch.int32) for k in num_classes])
    block_c = max(16, triton.next_power_of_2(int(head_C.numel())))
    return head_C.to(device), local_C.to(device), block_c


def _check_head(hidden_BD, weight_CD, bias_C, num_classes, y_BH, y_name):
    num_classes = tuple(int(k) for k in num_classes)
    if not num_classes or min(num_classes) < 1:
        raise KernelError(f"num_classes: need ≥1 head with ≥1 class each, got {list(num_classes)}")
    C = sum(num_classes)
    if hidden_BD.dim() != 2 or weight_CD.dim() != 2 or tuple(weight_CD.shape) != (C, hidden_BD.shape[1]):
        got = f"{tuple(hidden_BD.shape)} and {tuple(weight_CD.shape)}"
        raise KernelError(f"hidden_BD / weight_CD: expected [B, D] and [{C}, D], got {got}")
    if bias_C is not None and tuple(bias_C.shape) != (C,):
        raise KernelError(f"bias_C: expected shape ({C},), got {tuple(bias_C.shape)}")
    if hidden_BD.dtype != weight_CD.dtype:
        raise KernelError(f"weight_CD: dtype {weight_CD.dtype} differs from hidden_BD's {hidden_BD.dtype}")
    if tuple(y_BH.shape) != (hidden_BD.shape[0], len(num_classes)) or y_BH.dtype.is_floating_point:
        raise KernelError(f"{y_name}: expected integer shape [{hidden_BD.shape[0]}, {len(num_classes)}], "
                          f"got {y_BH.dtype} {tuple(y_BH.shape)}")
    k_H = torch.tensor(num_classes, device=y_BH.device)
    bad_BH = (y_BH < -1) | (y_BH >= k_H)
    if bool(bad_BH.any()):  # one device sync for all heads; the message names the first bad head
        i = int(bad_BH.any(0).nonzero()[0])
        bad = y_BH[:, i][bad_BH[:, i]][0].item()
        raise KernelError(f"{y_name}[:, {i}] (head {i}): value {bad} outside [-1, {num_classes[i]})")
    return num_classes


def per_head_ce_loss(
    logits: list[Tensor], labels_BH: Tensor, class_weights: list[Tensor] | None = None
) -> tuple[Tensor, list[Tensor]]:
    """Eq. 6-9: Σ_i CE(softmax(z_i), y_i), each head averaged over its labelled examples.

    Summing per-head means (rather than averaging over all labelled entries) gives every head the
    same weight however many labels it has — a safety head with few labels is not drowned out.
    Returns (total, per-head losses); a head with no labels in the batch contributes exactly 0.
    """
    per_head = []
    for i, logits_BK in enumerate(logits):
        labels_B = labels_BH[:, i]
        if not bool((labels_B >= 0).any()):
            per_head.append(logits_BK.sum() * 0.0)  # keeps the graph; no NaN from an empty mean
            continue
        w = None if class_weights is None else class_weights[i].to(logits_BK)
        per_head.append(F.cross_entropy(logits_BK.float(), labels_B, weight=w, ignore_index=-1))
    return torch.stack(per_head).sum(), per_head


def multihead_head_loss_reference(
    hidden_BD, weight_CD, bias_C, num_classes, labels_BH, class_weights=None, return_probs: bool = False
):
    """Plain PyTorch: the reward model's head then :func:`per_head_ce_loss`; (total, per_head_H)
    and, with ``return_probs``, the detached per-head softmax ``[B, C]`` in fp32."""
    logits = list(torch.split(F.linear(hidden_BD, weight_CD, bias_C), list(num_classes), dim=-1))
    total, per_head = per_head_ce_loss(logits, labels_BH, class_weights)
    if not return_probs:
        return total, torch.stack(per_head)
    return total, torch.stack(per_head), torch.cat([torch.softmax(z.detach().float(), dim=-1) for z in logits], 1)


def _check_mapping(num_classes, mean_C, std_C, kind, normalize_by, clip):
    if kind not in REWARD_KINDS:
        raise KernelError(f"kind: {kind!r} is not one of {REWARD_KINDS}")
    if normalize_by not in REWARD_NORMALIZE_BY:
        raise KernelError(f"normalize_by: {normalize_by!r} is not one of {REWARD_NORMALIZE_BY}")
    if not float(clip) >= 0.0:
        raise KernelError(f"clip: must be >= 0 (0 = off), got {clip}")
    C = sum(num_classes)
    for name, x_C in (("mean_C", mean_C), ("std_C", std_C)):
        if x_C is None:
            if kind == "zscore":
                raise KernelError(f"{name}: kind 'zscore' needs the per-class statistics")
        elif tuple(x_C.shape) != (C,):
            raise KernelError(f"{name}: expected shape ({C},), got {tuple(x_C.shape)}")


def multihead_reward_reference(
    hidden_BD, weight_CD, bias_C, num_classes, targets_BH, mean_C=None, std_C=None, kind: str = "zscore",
    normalize_by: str = "all", clip: float = 0.0,
):
    """Plain PyTorch: per-head softmax probabilities ``[B, C]`` (fp32) and the mapped rewards ``[B]``,
    op for op as :class:`moslim_mega.reward.mapping.RewardMapper` (so the numbers are its own)."""
    logits = torch.split(F.linear(hidden_BD, weight_CD, bias_C), list(num_classes), dim=-1)
    probs = [torch.softmax(z_BK.float(), dim=-1) for z_BK in logits]
    for i, p_BK in enumerate(probs):
        if not bool(torch.isfinite(p_BK).all()):
            raise KernelError(f"probs[{i}] (head {i}): contains NaN or Inf")
    if kind == "zscore":
        means = torch.split(mean_C, list(num_classes))
        stds = torch.split(std_C, list(num_classes))
    terms = []
    for i, p in enumerate(probs):
        p_BK = p.float()
        t_B = targets_BH[:, i].to(p_BK.device)
        named_B = t_B >= 0
        t_safe_B = t_B.clamp(min=0)  # −1 rows are computed on class 0, then masked out
        p_t_B = p_BK.gather(1, t_safe_B[:, None]).squeeze(1)
        if kind == "zscore":  # Eq. 11: (p[t] − avg[t]) / std[t]
            mean_K = means[i].to(p_BK.device)
            std_K = stds[i].to(p_BK.device)
            term_B = (p_t_B - mean_K.index_select(0, t_safe_B)) / std_K.index_select(0, t_safe_B)
        elif kind == "logprob":
            term_B = p_t_B.clamp(min=1e-12).log()
        else:  # neg_abs_dist: −Σ_c p[c]·|c − t|
            classes_K = torch.arange(p_BK.shape[1], device=p_BK.device, dtype=p_BK.dtype)
            dist_BK = (classes_K[None, :] - t_safe_B[:, None].to(p_BK.dtype)).abs()
            term_B = -(p_BK * dist_BK).sum(1)
        terms.append(torch.where(named_B, term_B, torch.zeros_like(term_B)))
    terms_BH = torch.stack(terms, dim=1)
    total_B = terms_BH.sum(1)
    if normalize_by == "all":
        reward_B = total_B / terms_BH.shape[1]
    else:  # rows with no named head have total 0; dividing by max(k, 1) keeps them at 0
        k_B = (targets_BH.to(terms_BH.device) >= 0).sum(1).clamp(min=1)
        reward_B = total_B / k_B.to(total_B.dtype)
    if clip > 0.0:
        reward_B = reward_B.clamp(-clip, clip)
    return torch.cat(probs, dim=1), reward_B


class FusedMultiheadHeadLoss(torch.autograd.Function):
    """forward(hidden_BD, weight_CD, bias_C, labels_BH, class_weight_C, num_classes)
    -> (total, per_head_H, probs_BC); probs_BC (the per-head softmax, fp32) is not differentiable."""

    @staticmethod
    def forward(ctx, hidden_BD, weight_CD, bias_C, labels_BH, class_weight_C, num_classes):
        B, D = hidden_BD.shape
        head_C, local_C, block_c = _layout(num_classes, hidden_BD.device)
        num_prog = triton.cdiv(B, BLOCK_B)
        logp_BC = torch.empty((B, block_c), dtype=torch.float32, device=hidden_BD.device)
        num_PC = torch.empty((num_prog, block_c), dtype=torch.float32, device=hidden_BD.device)
        den_PC = torch.empty_like(num_PC)  # every program writes its full row
        ieee = hidden_BD.dtype == torch.float32
        _head_fwd_kernel[(num_prog,)](
            hidden_BD, hidden_BD.stride(0), weight_CD, weight_CD.stride(0), bias_C, head_C, local_C, class_weight_C,
            labels_BH, labels_BH.stride(0), logp_BC, num_PC, den_PC, class_weight_C, class_weight_C, num_PC,
            B, D, len(head_C), len(num_classes), 0.0,
            MODE=0, KIND=0, NORM_ALL=True, BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D, BLOCK_C=block_c, IEEE=ieee,
        )
        per_head_H = torch.empty(len(num_classes), dtype=torch.float32, device=hidden_BD.device)
        den_H = torch.empty_like(per_head_H)
        total = torch.empty((), dtype=torch.float32, device=hidden_BD.device)
        _head_finalize_kernel[(1,)](num_PC, den_PC, num_prog, head_C, len(head_C), per_head_H, total, den_H,
                                    len(num_classes), BLOCK_P=64, BLOCK_C=block_c)
        ctx.save_for_backward(hidden_BD, weight_CD, labels_BH, class_weight_C, logp_BC, den_H, head_C, local_C)
        ctx.set_materialize_grads(False)
        # The probabilities are a by-product (the RM trainer's running class statistics read them).
        probs_BC = logp_BC[:, : len(head_C)].exp()
        ctx.mark_non_differentiable(probs_BC)
        return total, per_head_H, probs_BC

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, grad_per_head_H, _grad_probs_BC):
        hidden_BD, weight_CD, labels_BH, class_weight_C, logp_BC, den_H, head_C, local_C = ctx.saved_tensors
        zero = torch.zeros((), dtype=torch.float32, device=den_H.device)
        g_total = zero if grad_total is None else grad_total.float().contiguous()
        g_head_H = zero.expand(den_H.shape) if grad_per_head_H is None else grad_per_head_H.float()
        g_head_H = g_head_H.contiguous()
        B, D = hidden_BD.shape
        C, block_c, ieee = len(head_C), logp_BC.shape[1], hidden_BD.dtype == torch.float32
        common = (logp_BC, labels_BH, labels_BH.stride(0), class_weight_C, g_total, g_head_H, den_H, head_C, local_C)
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = torch.empty_like(hidden_BD)
            grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(D, BLOCK_D))
            _head_bwd_hidden_kernel[grid](*common, weight_CD, weight_CD.stride(0), grad_h, grad_h.stride(0), B, D, C,
                                          BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D, BLOCK_C=block_c, IEEE=ieee)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_w = torch.empty_like(weight_CD)
            grad_b = torch.empty(C, dtype=weight_CD.dtype, device=weight_CD.device)
            _head_bwd_weight_kernel[(triton.cdiv(D, BLOCK_D),)](
                *common, hidden_BD, hidden_BD.stride(0), grad_w, grad_b, B, D, C,
                BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D, BLOCK_C=block_c, IEEE=ieee,
            )
        return grad_h, grad_w if ctx.needs_input_grad[1] else None, grad_b if ctx.needs_input_grad[2] else None, \
            None, None, None


def fused_multihead_head(
    hidden_BD: Tensor,
    weight_CD: Tensor,
    bias_C: Tensor | None,
    num_classes: Sequence[int],
    labels_BH: Tensor,
    class_weights: list[Tensor] | None = None,
    impl: str | None = None,
    return_probs: bool = False,
) -> tuple[Tensor, ...]:
    """Training: Σ_i masked per-head CE of the head ``hidden·Wᵀ + b`` (Eq. 6-9, as
    :func:`per_head_ce_loss`); returns (total, per_head_H), both fp32 and differentiable, and with
    ``return_probs`` also the per-head softmax ``[B, C]`` (fp32, detached) from the same pass."""
    num_classes = _check_head(hidden_BD, weight_CD, bias_C, num_classes, labels_BH, "labels_BH")
    if class_weights is not None and [tuple(w.shape) for w in class_weights] != [(k,) for k in num_classes]:
        raise KernelError(f"class_weights: expected one [K_i] tensor per head for K = {list(num_classes)}")
    if resolve_impl(impl, hidden_BD.device) == "reference":
        return multihead_head_loss_reference(
            hidden_BD, weight_CD, bias_C, num_classes, labels_BH, class_weights, return_probs
        )
    dev = hidden_BD.device
    bias = bias_C if bias_C is not None else torch.zeros(sum(num_classes), dtype=weight_CD.dtype, device=dev)
    if class_weights is None:
        cw_C = torch.ones(sum(num_classes), dtype=torch.float32, device=dev)
    else:
        cw_C = torch.cat([w.to(dev, torch.float32) for w in class_weights])
    total, per_head_H, probs_BC = FusedMultiheadHeadLoss.apply(
        hidden_BD.contiguous(), weight_CD.contiguous(), bias.contiguous(), labels_BH.to(dev).long().contiguous(),
        cw_C, num_classes,
    )
    return (total, per_head_H, probs_BC) if return_probs else (total, per_head_H)


@torch.no_grad()
def fused_multihead_reward(
    hidden_BD: Tensor,
    weight_CD: Tensor,
    bias_C: Tensor | None,
    num_classes: Sequence[int],
    targets_BH: Tensor,
    mean_C: Tensor | None = None,
    std_C: Tensor | None = None,
    kind: str = "zscore",
    normalize_by: str = "all",
    clip: float = 0.0,
    impl: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Inference: per-head probabilities ``[B, C]`` and the mapped reward ``[B]`` (fp32) in one
    pass; the same numbers as :func:`multihead_reward_reference`. ``mean_C`` / ``std_C``: each
    class's mean and (floored) std probability, heads concatenated (needed for ``zscore`` only);
    ``kind`` one of :data:`REWARD_KINDS`; ``normalize_by`` ``all`` | ``named``; ``clip`` 0 = off."""
    num_classes = _check_head(hidden_BD, weight_CD, bias_C, num_classes, targets_BH, "targets_BH")
    _check_mapping(num_classes, mean_C, std_C, kind, normalize_by, clip)
    if resolve_impl(impl, hidden_BD.device) == "reference":
        return multihead_reward_reference(
            hidden_BD, weight_CD, bias_C, num_classes, targets_BH, mean_C, std_C, kind, normalize_by, clip
        )
    dev, B, D = hidden_BD.device, hidden_BD.shape[0], hidden_BD.shape[1]
    head_C, local_C, block_c = _layout(num_classes, dev)
    C = len(head_C)
    mean_C = torch.zeros(C) if mean_C is None else mean_C  # read by the zscore kind only
    std_C = torch.ones(C) if std_C is None else std_C
    mean_C = mean_C.to(dev, torch.float32)
    std_C = std_C.to(dev, torch.float32)
    bias = bias_C if bias_C is not None else torch.zeros(C, dtype=weight_CD.dtype, device=dev)
    targets = targets_BH.to(dev).long().contiguous()
    hidden, weight = hidden_BD.contiguous(), weight_CD.contiguous()
    logp_BC = torch.empty((B, block_c), dtype=torch.float32, device=dev)
    reward_B = torch.empty(B, dtype=torch.float32, device=dev)
    _head_fwd_kernel[(triton.cdiv(B, BLOCK_B),)](
        hidden, hidden.stride(0), weight, weight.stride(0), bias.contiguous(), head_C, local_C, mean_C,
        targets, targets.stride(0), logp_BC, reward_B, reward_B, mean_C, std_C, reward_B,
        B, D, C, len(num_classes), float(clip),
        MODE=1, KIND=REWARD_KINDS.index(kind), NORM_ALL=normalize_by == "all",
        BLOCK_B=BLOCK_B, BLOCK_D=BLOCK_D, BLOCK_C=block_c, IEEE=hidden.dtype == torch.float32,
    )
    return logp_BC[:, :C].exp(), reward_B
