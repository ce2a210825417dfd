"""Trainer-side token log-probs and entropies of an LM head, chunked over the vocabulary.

Legend: N rows (flattened tokens), H hidden size, V vocabulary, C vocabulary chunk, B batch, T tokens.
z = hidden·Wᵀ / temperature are the scaled logits; logZ = logsumexp(z); p = softmax(z).

The plain reference materialises the N×V logits (≈ 19 GB for 32k tokens × 150k vocab in fp32); the
chunked autograd function keeps only O(N·C) live and O(N) saved state, recomputing each chunk in
backward. It is also the reference interface for a later Triton kernel.

Public API: :func:`linear_logprob_entropy_reference`, :class:`ChunkedLinearLogprob`,
:func:`chunked_linear_logprob_entropy`, :func:`sequence_logprobs`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .core import AlgoError

__all__ = [
    "linear_logprob_entropy_reference",
    "ChunkedLinearLogprob",
    "chunked_linear_logprob_entropy",
    "sequence_logprobs",
]


def _check_inputs(hidden_NH: Tensor, weight_VH: Tensor, targets_N: Tensor, temperature: float) -> None:
    if hidden_NH.dim() != 2 or weight_VH.dim() != 2 or hidden_NH.shape[1] != weight_VH.shape[1]:
        got = f"{tuple(hidden_NH.shape)} and {tuple(weight_VH.shape)}"
        raise AlgoError(f"hidden_NH / weight_VH: expected [N, H] and [V, H], got {got}")
    if targets_N.shape != (hidden_NH.shape[0],) or targets_N.dtype not in (torch.int32, torch.int64):
        got = f"{targets_N.dtype} {tuple(targets_N.shape)}"
        raise AlgoError(f"targets_N: expected integer shape ({hidden_NH.shape[0]},), got {got}")
    if targets_N.numel() and not bool(((targets_N >= 0) & (targets_N < weight_VH.shape[0])).all()):
        raise AlgoError(f"targets_N: token ids must lie in [0, {weight_VH.shape[0]})")
    if not float(temperature) > 0:
        raise AlgoError(f"temperature: must be > 0, got {temperature!r}")


def linear_logprob_entropy_reference(
    hidden_NH: Tensor, weight_VH: Tensor, targets_N: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Plain PyTorch: (log p(target), entropy −Σ p log p) of softmax(hidden·Wᵀ / temperature),
    computed in float32 (or float64 if given) whatever the input dtype."""
    _check_inputs(hidden_NH, weight_VH, targets_N, temperature)
    dtype = torch.promote_types(torch.promote_types(hidden_NH.dtype, weight_VH.dtype), torch.float32)
    logits_NV = hidden_NH.to(dtype) @ weight_VH.to(dtype).T / temperature
    logp_NV = torch.log_softmax(logits_NV, dim=-1)
    logp_N = logp_NV.gather(1, targets_N.long()[:, None]).squeeze(1)
    entropy_N = -(logp_NV.exp() * logp_NV).sum(-1)
    return logp_N, entropy_N


class ChunkedLinearLogprob(torch.autograd.Function):
    """forward(hidden_NH, weight_VH, targets_N, temperature, chunk_size) -> (logp_N, entropy_N).

    Forward is an online softmax over vocabulary chunks (running max m, Σ exp(z − m) and
    Σ exp(z − m)·z), so logZ and E_p[z] come out of one pass; entropy = logZ − E_p[z].
    Backward recomputes each chunk's logits and uses
    dL/dz_j = g_lp·(1[j = t] − p_j) − g_H·p_j·(z_j − E_p[z]), then chains through 1/temperature.
    """

    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, temperature, chunk_size):
        dtype = torch.promote_types(hidden_NH.dtype, torch.float32)  # fp32 accumulation for bf16
        num_rows, vocab = hidden_NH.shape[0], weight_VH.shape[0]
        h_NH = hidden_NH.to(dtype)
        targets_N = targets_N.long()
        run_max_N = torch.full((num_rows,), float("-inf"), dtype=dtype, device=hidden_NH.device)
        run_sum_N = torch.zeros_like(run_max_N)
        run_zsum_N = torch.zeros_like(run_max_N)
        target_logit_N = torch.zeros_like(run_max_N)
        for start in range(0, vocab, chunk_size):
            end = min(start + chunk_size, vocab)
            z_NC = h_NH @ weight_VH[start:end].to(dtype).T / temperature
            new_max_N = torch.maximum(run_max_N, z_NC.amax(dim=1))
            rescale_N = torch.exp(run_max_N - new_max_N)  # exp(−inf) = 0 on the first chunk
            e_NC = torch.exp(z_NC - new_max_N[:, None])
            run_sum_N = run_sum_N * rescale_N + e_NC.sum(dim=1)
            run_zsum_N = run_zsum_N * rescale_N + (e_NC * z_NC).sum(dim=1)
            run_max_N = new_max_N
            in_chunk_N = (targets_N >= start) & (targets_N < end)
            local_N = (targets_N - start).clamp(0, end - start - 1)
            target_logit_N = torch.where(in_chunk_N, z_NC.gather(1, local_N[:, None]).squeeze(1), target_logit_N)
        logz_N = run_max_N + torch.log(run_sum_N)
        mean_z_N = run_zsum_N / run_sum_N
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N, logz_N, mean_z_N)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.set_materialize_grads(False)
        return target_logit_N - logz_N, logz_N - mean_z_N

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logp_N, grad_entropy_N):
        hidden_NH, weight_VH, targets_N, logz_N, mean_z_N = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (grad_logp_N is None and grad_entropy_N is None) or not (need_h or need_w):
            return None, None, None, None, None
        dtype, temperature = logz_N.dtype, ctx.temperature
        h_NH = hidden_NH.to(dtype)
        grad_h_NH = torch.zeros_like(h_NH) if need_h else None
        grad_w_VH = torch.empty(weight_VH.shape, dtype=dtype, device=weight_VH.device) if need_w else None
        g_lp_N = None if grad_logp_N is None else grad_logp_N.to(dtype)
        g_ent_N = None if grad_entropy_N is None else grad_entropy_N.to(dtype)
        rows_N = torch.arange(h_NH.shape[0], device=h_NH.device)
        for start in range(0, weight_VH.shape[0], ctx.chunk_size):
            end = min(start + ctx.chunk_size, weight_VH.shape[0])
            w_CH = weight_VH[start:end].to(dtype)
            z_NC = h_NH @ w_CH.T / temperature
            p_NC = torch.exp(z_NC - logz_N[:, None])
            grad_z_NC = torch.zeros_like(z_NC)
            if g_lp_N is not None:
                grad_z_NC -= g_lp_N[:, None] * p_NC
                in_chunk_N = (targets_N >= start) & (targets_N < end)
                rows = rows_N[in_chunk_N]
                grad_z_NC[rows, targets_N[in_chunk_N] - start] += g_lp_N[in_chunk_N]
            if g_ent_N is not None:
                grad_z_NC -= g_ent_N[:, None] * p_NC * (z_NC - mean_z_N[:, None])
            grad_z_NC /= temperature  # z = (h·Wᵀ) / temperature
            if need_h:
                grad_h_NH += grad_z_NC @ w_CH
            if need_w:
                grad_w_VH[start:end] = grad_z_NC.T @ h_NH
        grad_h = grad_h_NH.to(hidden_NH.dtype) if need_h else None
        grad_w = grad_w_VH.to(weight_VH.dtype) if need_w else None
        return grad_h, grad_w, None, None, None


def chunked_linear_logprob_entropy(
    hidden_NH: Tensor, weight_VH: Tensor, targets_N: Tensor, temperature: float = 1.0, chunk_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """(log p(target), entropy) of softmax(hidden·Wᵀ / temperature) without materialising N×V.
    Outputs are float32 (float64 for float64 inputs); either may be left unused."""
    _check_inputs(hidden_NH, weight_VH, targets_N, temperature)
    if int(chunk_size) < 1:
        raise AlgoError(f"chunk_size: must be >= 1, got {chunk_size!r}")
    return ChunkedLinearLogprob.apply(hidden_NH, weight_VH, targets_N, float(temperature), int(chunk_size))


def _check_plain_linear_head(model) -> Tensor:
    """The LM head weight, after refusing heads whose logits are not plain hidden·Wᵀ."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        name = type(head).__name__
        raise AlgoError(f"model: LM head {name} has a bias; sequence_logprobs handles bias-free heads only")
    config = getattr(model, "config", None)
    for field in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, field, None) not in (None, 1, 1.0):
            raise AlgoError(f"model: config.{field}={getattr(config, field)!r} changes the logits; not supported")
    return head.weight


def sequence_logprobs(
    model, input_ids_BT: Tensor, attention_mask_BT: Tensor, temperature: float = 1.0, chunk_size: int = 4096
) -> tuple[Tensor, Tensor]:
    """Token-aligned (logp_BT, entropy_BT) of a HF causal LM (Llama / Qwen2 family).

    logp_BT[:, t] = log p(token_t | tokens_<t) and entropy_BT[:, t] is the entropy of that predictive
    distribution. Position ids are cumsum(mask) − 1, as HF ``generate`` uses for left-padded prompts,
    so these are the log-probs of the sampler. Zero where attention_mask is 0, at column 0, and at the
    first attended token of a left-padded row: that token has no real context (it would be
    "predicted" from padding), so a left-padded and a right-padded copy of one sequence give the same
    values. Float32 output.
    """
    if input_ids_BT.dim() != 2 or attention_mask_BT.shape != input_ids_BT.shape:
        got = f"{tuple(input_ids_BT.shape)} and {tuple(attention_mask_BT.shape)}"
        raise AlgoError(f"input_ids_BT / attention_mask_BT: expected equal [B, T] shapes, got {got}")
    weight_VH = _check_plain_linear_head(model)
    base = getattr(model, model.base_model_prefix)
    mask_BT = attention_mask_BT.long()
    position_ids_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
    # Row (b, t−1) predicts token (b, t); only rows whose context token and target are both attended.
    valid_BT = torch.zeros_like(mask_BT, dtype=torch.bool)
    valid_BT[:, 1:] = (mask_BT[:, 1:] != 0) & (mask_BT[:, :-1] != 0)
    targets_N = input_ids_BT[:, 1:][valid_BT[:, 1:]]
    from ..parallel.vocab_parallel import parallel_info

    info = parallel_info(model)
    if info is not None:
        # A parallelised model (issue 6): its own forward runs FSDP2's gather hooks and, under tensor
        # parallel, returns only this rank's vocabulary slice of the logits (never gathered).
        logits_BTV = model(
            input_ids=input_ids_BT, attention_mask=attention_mask_BT, position_ids=position_ids_BT, use_cache=False
        ).logits
        z_NV = logits_BTV[:, :-1][valid_BT[:, 1:]].float() / temperature
        logp_N, entropy_N = info.logprob_entropy(z_NV, targets_N)
    else:
        hidden_BTH = base(
            input_ids=input_ids_BT, attention_mask=attention_mask_BT, position_ids=position_ids_BT, use_cache=False
        ).last_hidden_state
        hidden_NH = hidden_BTH[:, :-1][valid_BT[:, 1:]]
        logp_N, entropy_N = chunked_linear_logprob_entropy(hidden_NH, weight_VH, targets_N, temperature, chunk_size)
    logp_BT = torch.zeros(mask_BT.shape, dtype=logp_N.dtype, device=logp_N.device)
    entropy_BT = torch.zeros_like(logp_BT)
    # index_put (out-of-place) keeps the graph from logp_N back to the model.
    logp_BT = logp_BT.index_put((valid_BT,), logp_N)
    entropy_BT = entropy_BT.index_put((valid_BT,), entropy_N)
    return logp_BT, entropy_BT
