"""Fused linear → token log-prob and entropy, with a vocabulary-parallel variant (issue 7).

Legend: N rows (flattened tokens), H hidden size, V vocabulary (Vs: one rank's shard), C a vocabulary
chunk. z = hidden·Wᵀ / temperature; logZ = logsumexp(z); p = softmax(z); entropy = logZ − E_p[z].

Design. The vocabulary is walked in chunks of C rows of W. Per chunk one dense matmul (cuBLAS on
GPU) gives z_NC, and one Triton kernel folds it into the running online-softmax state per row —
max m, Σ e^(z−m), Σ e^(z−m)·z and the target logit — so only N×C logits ever exist, never N×V.
Backward recomputes each chunk's logits and one Triton kernel turns them, in place, into
dL/dz = g_lp·(1[j = t] − p_j) − g_H·p_j·(z_j − E_p[z]) (÷ temperature); two matmuls then give
the chunk's dW rows and its share of dh. The elementwise work that eager PyTorch spreads over ~8
passes of N×C memory becomes one read (forward) and one read + write (backward) per chunk.

Vocab-parallel (Megatron-style column-parallel LM head): each rank holds Vs = V/TP rows of W and
computes the same per-row state over its shard; then two collectives combine it — all-reduce MAX
of m, then one all-reduce SUM of the rescaled [Σe, Σe·z, target logit] stack. In backward each
rank's dW shard is local and the partial dh is all-reduced (SUM), as the column-parallel
linear's input gradient must be.

Rows whose target equals ``ignore_index`` give log-prob 0 and entropy 0 and no gradient.
Matches :func:`linear_logprob_entropy_reference` (the plain-PyTorch reference, materialising N×V) on
the other rows. This module imports nothing of the package beyond :mod:`.dispatch`: kernels are leaves.

Public API: :func:`fused_linear_logprob`, :func:`vocab_parallel_linear_logprob`,
:func:`linear_logprob_reference`, :func:`linear_logprob_entropy_reference`,
:func:`check_linear_logprob_inputs`, :class:`FusedLinearLogprob`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dispatch import KernelError, resolve_impl

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional at run time; the reference path needs only torch
    triton = None

__all__ = [
    "FusedLinearLogprob",
    "check_linear_logprob_inputs",
    "fused_linear_logprob",
    "linear_logprob_entropy_reference",
    "linear_logprob_reference",
    "vocab_parallel_linear_logprob",
]

DEFAULT_CHUNK = 8192
BLOCK_N, BLOCK_V = 32, 128  # stats kernel tiles; the grad kernel is elementwise over N×C
_MM_OUT_DTYPE = None  # whether torch.mm(bf16, bf16, out_dtype=float32) works here (None = not probed)

if triton is not None:

    @triton.jit
    def _chunk_stats_kernel(
        z_ptr, stride_zn, tgt_ptr, m_ptr, s_ptr, zs_ptr, tl_ptr,
        n_rows, n_cols, inv_temp,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        # One program owns BLOCK_N rows and walks the chunk's columns in BLOCK_V tiles.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < n_rows
        # Padding rows start at m = 0 so that no exp(−inf − (−inf)) NaN is ever formed.
        m = tl.load(m_ptr + rows, mask=rmask, other=0.0)
        s = tl.load(s_ptr + rows, mask=rmask, other=0.0)
        zs = tl.load(zs_ptr + rows, mask=rmask, other=0.0)
        tlog = tl.load(tl_ptr + rows, mask=rmask, other=0.0)
        tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
        for v0 in range(0, n_cols, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            valid = rmask[:, None] & (cols < n_cols)[None, :]
            z = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :], mask=valid, other=float("-inf"))
            z = z.to(tl.float32) * inv_temp
            new_m = tl.maximum(m, tl.max(z, axis=1))
            rescale = tl.exp(m - new_m)  # 0 on a row's first tile (m = −inf)
            e = tl.exp(z - new_m[:, None])
            s = s * rescale + tl.sum(e, axis=1)
            zs = zs * rescale + tl.sum(e * tl.where(valid, z, 0.0), axis=1)  # 0·(−inf) would be NaN
            m = new_m
            hit = cols[None, :] == tgt[:, None]
            tlog += tl.sum(tl.where(hit & valid, z, 0.0), axis=1)
        tl.store(m_ptr + rows, m, mask=rmask)
        tl.store(s_ptr + rows, s, mask=rmask)
        tl.store(zs_ptr + rows, zs, mask=rmask)
        tl.store(tl_ptr + rows, tlog, mask=rmask)

    @triton.jit
    def _chunk_grad_kernel(
        z_ptr, stride_zn, dz_ptr, stride_dn, tgt_ptr, logz_ptr, meanz_ptr, glp_ptr, gent_ptr,
        n_rows, n_cols, inv_temp,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        # dz may alias z: every element is read, then written, by the same program.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        rmask = rows < n_rows
        valid = rmask[:, None] & (cols < n_cols)[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_zn + cols[None, :], mask=valid, other=0.0)
        z = z.to(tl.float32) * inv_temp
        logz = tl.load(logz_ptr + rows, mask=rmask, other=0.0)
        meanz = tl.load(meanz_ptr + rows, mask=rmask, other=0.0)
        g_lp = tl.load(glp_ptr + rows, mask=rmask, other=0.0)
        g_ent = tl.load(gent_ptr + rows, mask=rmask, other=0.0)
        tgt = tl.load(tgt_ptr + rows, mask=rmask, other=-1)
        p = tl.exp(z - logz[:, None])
        dz = -(g_lp[:, None] + g_ent[:, None] * (z - meanz[:, None])) * p
        dz += tl.where(cols[None, :] == tgt[:, None], g_lp[:, None], 0.0)
        dz = dz * inv_temp  # z = (h·Wᵀ) / temperature
        tl.store(dz_ptr + rows[:, None] * stride_dn + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=valid)


def _chunk_logits(h_NH: Tensor, w_CH: Tensor, impl: str) -> Tensor:
    """z_NC before the temperature: fp32 for the reference; in the matmul dtype (fp32 output
    where the backend offers it for bf16/fp16) for Triton."""
    if impl == "reference":
        return h_NH.float() @ w_CH.float().T if h_NH.dtype != torch.float64 else h_NH @ w_CH.double().T
    global _MM_OUT_DTYPE
    if h_NH.dtype in (torch.bfloat16, torch.float16) and h_NH.is_cuda and _MM_OUT_DTYPE is not False:
        try:  # fp32 logits keep log-probs accurate; older torch lacks mm(out_dtype=)
            z_NC = torch.mm(h_NH, w_CH.T, out_dtype=torch.float32)
            _MM_OUT_DTYPE = True
            return z_NC
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False  # probe once: bf16 logits from here on
    return h_NH @ w_CH.T


def _local_state(h_NH, w_VH, t_local_N, inv_temp, chunk, impl):
    """Per-row online-softmax state over this weight (shard): (m, Σe^(z−m), Σe^(z−m)·z, z_target)."""
    n = h_NH.shape[0]
    acc = torch.float64 if h_NH.dtype == torch.float64 else torch.float32
    m_N = torch.full((n,), float("-inf"), dtype=acc, device=h_NH.device)
    s_N, zs_N, tlog_N = (torch.zeros_like(m_N) for _ in range(3))
    for start in range(0, w_VH.shape[0], chunk):
        end = min(start + chunk, w_VH.shape[0])
        z_NC = _chunk_logits(h_NH, w_VH[start:end], impl)
        t_N = t_local_N - start
        if impl == "triton":
            z_NC = z_NC.contiguous()
            grid = (triton.cdiv(n, BLOCK_N),)
            _chunk_stats_kernel[grid](
                z_NC, z_NC.stride(0), t_N, m_N, s_N, zs_N, tlog_N, n, end - start, inv_temp,
                BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V,
            )
            continue
        z_NC = z_NC.to(acc) * inv_temp
        new_m_N = torch.maximum(m_N, z_NC.amax(dim=1))
        rescale_N = torch.exp(m_N - new_m_N)
        e_NC = torch.exp(z_NC - new_m_N[:, None])
        s_N = s_N * rescale_N + e_NC.sum(1)
        zs_N = zs_N * rescale_N + (e_NC * z_NC).sum(1)
        m_N = new_m_N
        hit_N = (t_N >= 0) & (t_N < end - start)
        tlog_N = tlog_N + torch.where(hit_N, z_NC.gather(1, t_N.clamp(0, end - start - 1)[:, None])[:, 0], 0.0)
    return m_N, s_N, zs_N, tlog_N


def _chunk_grad(z_NC, t_N, logz_N, meanz_N, g_lp_N, g_ent_N, inv_temp, impl, out_dtype) -> Tensor:
    """dL/dz of one chunk in ``out_dtype`` (the backward matmuls' dtype)."""
    if impl == "triton":
        z_NC = z_NC.contiguous()
        # In place when the dtypes agree; else written straight in the matmul dtype (no extra cast pass).
        dz_NC = z_NC if z_NC.dtype == out_dtype else torch.empty(z_NC.shape, dtype=out_dtype, device=z_NC.device)
        n, c = z_NC.shape
        grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(c, BLOCK_V))
        _chunk_grad_kernel[grid](
            z_NC, z_NC.stride(0), dz_NC, dz_NC.stride(0), t_N, logz_N, meanz_N, g_lp_N, g_ent_N, n, c, inv_temp,
            BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V,
        )
        return dz_NC
    z_NC = z_NC.to(logz_N.dtype) * inv_temp
    p_NC = torch.exp(z_NC - logz_N[:, None])
    dz_NC = -(g_lp_N[:, None] + g_ent_N[:, None] * (z_NC - meanz_N[:, None])) * p_NC
    cols_C = torch.arange(z_NC.shape[1], device=z_NC.device)
    dz_NC = dz_NC + torch.where(cols_C[None, :] == t_N[:, None], g_lp_N[:, None], 0.0)
    return (dz_NC * inv_temp).to(out_dtype)


class FusedLinearLogprob(torch.autograd.Function):
    """forward(hidden_NH, weight_VH, targets_N, temperature, chunk, ignore_index, vocab_start, group, impl)
    -> (logp_N, entropy_N) in fp32 (fp64 for fp64 input). ``group`` None = the whole vocabulary."""

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, temperature, chunk, ignore_index, vocab_start, group, impl):
        inv_temp = 1.0 / temperature
        valid_N = targets_N != ignore_index
        # Local target index; −1 (never a column) for ignored rows and targets on other ranks.
        t_local_N = torch.where(valid_N, targets_N - vocab_start, -1).long()
        t_local_N = torch.where(t_local_N < weight_VH.shape[0], t_local_N, -1)
        m_N, s_N, zs_N, tlog_N = _local_state(hidden_NH, weight_VH, t_local_N, inv_temp, chunk, impl)
        if group is not None:  # collective 1: global max; collective 2: the rescaled sums
            max_N = m_N.clone()
            dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=group)
            scale_N = torch.exp(m_N - max_N)
            packed_3N = torch.stack([s_N * scale_N, zs_N * scale_N, tlog_N])
            dist.all_reduce(packed_3N, op=dist.ReduceOp.SUM, group=group)
            m_N, (s_N, zs_N, tlog_N) = max_N, packed_3N.unbind(0)
        logz_N = m_N + torch.log(s_N)
        meanz_N = zs_N / s_N
        logp_N = torch.where(valid_N, tlog_N - logz_N, 0.0)
        entropy_N = torch.where(valid_N, logz_N - meanz_N, 0.0)
        ctx.save_for_backward(hidden_NH, weight_VH, t_local_N, logz_N, meanz_N, valid_N)
        ctx.cfg = (inv_temp, chunk, group, impl)
        ctx.set_materialize_grads(False)
        return logp_N, entropy_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp_N, grad_entropy_N):
        hidden_NH, weight_VH, t_local_N, logz_N, meanz_N, valid_N = ctx.saved_tensors
        inv_temp, chunk, group, impl = ctx.cfg
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp_N is None and grad_entropy_N is None) or not (need_h or need_w):
            return (None,) * 9
        zero_N = torch.zeros_like(logz_N)
        g_lp_N = zero_N if grad_logp_N is None else torch.where(valid_N, grad_logp_N.to(logz_N.dtype), 0.0)
        g_ent_N = zero_N if grad_entropy_N is None else torch.where(valid_N, grad_entropy_N.to(logz_N.dtype), 0.0)
        # Reference works in fp32; Triton feeds dz to cuBLAS in the input dtype (bf16 on GPU).
        mm_dtype = logz_N.dtype if impl == "reference" else hidden_NH.dtype
        h_NH = hidden_NH.to(mm_dtype)
        grad_h_NH = torch.zeros(hidden_NH.shape, dtype=logz_N.dtype, device=hidden_NH.device) if need_h else None
        grad_w_VH = torch.empty_like(weight_VH) if need_w else None
        for start in range(0, weight_VH.shape[0], chunk):
            end = min(start + chunk, weight_VH.shape[0])
            w_CH = weight_VH[start:end].to(mm_dtype)
            z_NC = _chunk_logits(hidden_NH, weight_VH[start:end], impl)
            dz_NC = _chunk_grad(z_NC, t_local_N - start, logz_N, meanz_N, g_lp_N, g_ent_N, inv_temp, impl, mm_dtype)
            if need_h:
                grad_h_NH += dz_NC @ w_CH
            if need_w:
                grad_w_VH[start:end] = (dz_NC.T @ h_NH).to(weight_VH.dtype)
        if need_h and group is not None:  # the column-parallel input gradient sums over shards
            dist.all_reduce(grad_h_NH, op=dist.ReduceOp.SUM, group=group)
        grad_h = grad_h_NH.to(hidden_NH.dtype) if need_h else None
        return grad_h, grad_w_VH, None, None, None, None, None, None, None


def _check(hidden_NH, weight_VH, targets_N, temperature, chunk_size, vocab_size, ignore_index):
    if hidden_NH.dim() != 2 or weight_VH.dim() != 2 or hidden_NH.shape[1] != weight_VH.shape[1]:
        got = f"{tuple(hidden_NH.shape)} and {tuple(weight_VH.shape)}"
        raise KernelError(f"hidden_NH / weight_VH: expected [N, H] and [V, H], got {got}")
    if hidden_NH.dtype != weight_VH.dtype:
        raise KernelError(f"weight_VH: dtype {weight_VH.dtype} differs from hidden_NH's {hidden_NH.dtype}")
    if targets_N.shape != (hidden_NH.shape[0],) or targets_N.dtype not in (torch.int32, torch.int64):
        got = f"{targets_N.dtype} {tuple(targets_N.shape)}"
        raise KernelError(f"targets_N: expected integer shape ({hidden_NH.shape[0]},), got {got}")
    bad_N = (targets_N != ignore_index) & ((targets_N < 0) | (targets_N >= vocab_size))
    if bool(bad_N.any()):
        bad = targets_N[bad_N][0].item()
        raise KernelError(f"targets_N: token id {bad} outside [0, {vocab_size}) and not ignore_index={ignore_index}")
    if not float(temperature) > 0:
        raise KernelError(f"temperature: must be > 0, got {temperature!r}")
    if int(chunk_size) < 1:
        raise KernelError(f"chunk_size: must be >= 1, got {chunk_size!r}")


def fused_linear_logprob(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    targets_N: Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK,
    impl: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(log p(target), entropy) of softmax(hidden·Wᵀ / temperature) without materialising N×V.
    ``impl``: ``triton`` / ``reference`` / ``auto`` (default: env ``MOSLIM_KERNELS``, else auto)."""
    _check(hidden_NH, weight_VH, targets_N, temperature, chunk_size, weight_VH.shape[0], ignore_index)
    which = resolve_impl(impl, hidden_NH.device)
    return FusedLinearLogprob.apply(
        hidden_NH, weight_VH, targets_N, float(temperature), int(chunk_size), int(ignore_index), 0, None, which
    )


def vocab_parallel_linear_logprob(
    hidden_NH: Tensor,
    weight_shard_VsH: Tensor,
    targets_N: Tensor,
    group,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int = DEFAULT_CHUNK,
    impl: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Vocab-parallel form: this rank holds rows [vocab_start, vocab_start + Vs) of W; hidden and
    targets are the same on every rank of ``group``, and so are the outputs. Defaults assume equal
    shards in rank order (vocab_start = rank·Vs, vocab_size = world·Vs)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    shard = weight_shard_VsH.shape[0] if weight_shard_VsH.dim() == 2 else 0
    start = rank * shard if vocab_start is None else int(vocab_start)
    total = world * shard if vocab_size is None else int(vocab_size)
    _check(hidden_NH, weight_shard_VsH, targets_N, temperature, chunk_size, total, ignore_index)
    if not 0 <= start <= total - shard:
        raise KernelError(f"vocab_start: {start} + shard {shard} does not fit vocab_size {total}")
    which = resolve_impl(impl, hidden_NH.device)
    return FusedLinearLogprob.apply(
        hidden_NH, weight_shard_VsH, targets_N, float(temperature), int(chunk_size), int(ignore_index), start, group,
        which,
    )


def check_linear_logprob_inputs(hidden_NH: Tensor, weight_VH: Tensor, targets_N: Tensor, temperature: float) -> None:
    """The reference's input check (no ``ignore_index``: every target must be a token id)."""
    if hidden_NH.dim() != 2 or weight_VH.dim() != 2 or hidden_NH.shape[1] != weight_VH.shape[1]:
        got = f"{tuple(hidden_NH.shape)} and {tuple(weight_VH.shape)}"
        raise KernelError(f"hidden_NH / weight_VH: expected [N, H] and [V, H], got {got}")
    if targets_N.shape != (hidden_NH.shape[0],) or targets_N.dtype not in (torch.int32, torch.int64):
        got = f"{targets_N.dtype} {tuple(targets_N.shape)}"
        raise KernelError(f"targets_N: expected integer shape ({hidden_NH.shape[0]},), got {got}")
    if targets_N.numel() and not bool(((targets_N >= 0) & (targets_N < weight_VH.shape[0])).all()):
        raise KernelError(f"targets_N: token ids must lie in [0, {weight_VH.shape[0]})")
    if not float(temperature) > 0:
        raise KernelError(f"temperature: must be > 0, got {temperature!r}")


def linear_logprob_entropy_reference(
    hidden_NH: Tensor, weight_VH: Tensor, targets_N: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: (log p(target), entropy −Σ p log p) of softmax(hidden·Wᵀ / temperature),
    computed in float32 (or float64 if given) whatever the input dtype."""
    check_linear_logprob_inputs(hidden_NH, weight_VH, targets_N, temperature)
    dtype = torch.promote_types(torch.promote_types(hidden_NH.dtype, weight_VH.dtype), torch.float32)
    logits_NV = hidden_NH.to(dtype) @ weight_VH.to(dtype).T / temperature
    logp_NV = torch.log_softmax(logits_NV, dim=-1)
    logp_N = logp_NV.gather(1, targets_N.long()[:, None]).squeeze(1)
    entropy_N = -(logp_NV.exp() * logp_NV).sum(-1)
    return logp_N, entropy_N


def linear_logprob_reference(
    hidden_NH: Tensor, weight_VH: Tensor, targets_N: Tensor, temperature: float = 1.0, ignore_index: int = -100
) -> tuple[Tensor, Tensor]:
    """Materialising reference: :func:`linear_logprob_entropy_reference` with ignored
    rows set to 0 (and so given no gradient)."""
    valid_N = targets_N != ignore_index
    logp_N, entropy_N = linear_logprob_entropy_reference(
        hidden_NH, weight_VH, torch.where(valid_N, targets_N, 0), temperature
    )
    return torch.where(valid_N, logp_N, 0.0), torch.where(valid_N, entropy_N, 0.0)
