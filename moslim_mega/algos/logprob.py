"""Trainer-side token log-probs and entropies of an LM head, chunked over the vocabulary.

Legend: N rows (flattened tokens), H hidden size, V vocabulary, C vocabulary chunk, B batch, T tokens.
z = hidden·Wᵀ / temperature are the scaled logits; logZ = logsumexp(z); p = softmax(z).

The plain reference materialises the N×V logits (≈ 19 GB for 32k tokens × 150k vocab in fp32); the
chunked path keeps only O(N·C) live and O(N) saved state, recomputing each chunk in backward — in
plain PyTorch on CPU, as the fused Triton kernel of :mod:`moslim_mega.kernels.linear_logprob` on CUDA.

Public API: :func:`chunked_linear_logprob_entropy`, :func:`sequence_logprobs`, and
:func:`linear_logprob_entropy_reference` (defined beside its kernel in
:mod:`moslim_mega.kernels.linear_logprob`, re-exported here).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels.dispatch import KernelError
from ..kernels.linear_logprob import (
    check_linear_logprob_inputs,
    fused_linear_logprob,
    linear_logprob_entropy_reference,  # re-exported: the reference lives beside its kernel
)
from .core import AlgoError

__all__ = [
    "linear_logprob_entropy_reference",
    "chunked_linear_logprob_entropy",
    "sequence_logprobs",
]


def _check_inputs(hidden_NH: Tensor, weight_VH: Tensor, targets_N: Tensor, temperature: float) -> None:
    """The reference's input check, raising AlgoError (as this module's callers expect)."""
    try:
        check_linear_logprob_inputs(hidden_NH, weight_VH, targets_N, temperature)
    except KernelError as e:
        raise AlgoError(str(e)) from None


def chunked_linear_logprob_entropy(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    targets_N: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 8192,
    impl: str | None = "reference",
) -> tuple[Tensor, Tensor]:
    """(log p(target), entropy) of softmax(hidden·Wᵀ / temperature) without materialising N×V.

    Forward is an online softmax over vocabulary chunks (running max m, Σ exp(z − m) and
    Σ exp(z − m)·z), so logZ and E_p[z] come out of one pass; entropy = logZ − E_p[z]. Backward
    recomputes each chunk's logits and uses dL/dz_j = g_lp·(1[j = t] − p_j) − g_H·p_j·(z_j − E_p[z]).
    One implementation serves both: :class:`moslim_mega.kernels.linear_logprob.FusedLinearLogprob`,
    whose ``impl="reference"`` is plain PyTorch and ``"triton"`` the fused kernel (``None``: the
    ``MOSLIM_KERNELS`` environment variable, else Triton on CUDA). Outputs are float32 (float64
    for float64 inputs); either may be left unused.
    """
    _check_inputs(hidden_NH, weight_VH, targets_N, temperature)
    if int(chunk_size) < 1:
        raise AlgoError(f"chunk_size: must be >= 1, got {chunk_size!r}")
    return fused_linear_logprob(hidden_NH, weight_VH, targets_N, temperature, chunk_size=chunk_size, impl=impl)


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
    model,
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 8192,
    impl: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Token-aligned (logp_BT, entropy_BT) of a HF causal LM (Llama / Qwen2 family).

    logp_BT[:, t] = log p(token_t | tokens_<t) and entropy_BT[:, t] is the entropy of that predictive
    distribution. Position ids are cumsum(mask) − 1, as HF ``generate`` uses for left-padded prompts,
    so these are the log-probs of the sampler. Zero where attention_mask is 0, at column 0, and at the
    first attended token of a left-padded row: that token has no real context (it would be
    "predicted" from padding), so a left-padded and a right-padded copy of one sequence give the same
    values. Float32 output. The N×V logits never exist: the fused linear → log-prob (``impl``:
    ``triton`` / ``reference`` / None = ``MOSLIM_KERNELS`` or auto) walks ``chunk_size`` vocabulary rows
    at a time.
    """
    if input_ids_BT.dim() != 2 or attention_mask_BT.shape != input_ids_BT.shape:
        got = f"{tuple(input_ids_BT.shape)} and {tuple(attention_mask_BT.shape)}"
        raise AlgoError(f"input_ids_BT / attention_mask_BT: expected equal [B, T] shapes, got {got}")
    weight_VH = _check_plain_linear_head(model)
    mask_BT = attention_mask_BT.long()
    position_ids_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
    # Row (b, t−1) predicts token (b, t); only rows whose context token and target are both attended.
    valid_BT = torch.zeros_like(mask_BT, dtype=torch.bool)
    valid_BT[:, 1:] = (mask_BT[:, 1:] != 0) & (mask_BT[:, :-1] != 0)
    targets_N = input_ids_BT[:, 1:][valid_BT[:, 1:]]
    inputs = dict(input_ids=input_ids_BT, attention_mask=attention_mask_BT, position_ids=position_ids_BT,
                  use_cache=False)
    from ..parallel.vocab_parallel import LogprobLMHead, LogprobRequest

    head = model.get_output_embeddings()
    if isinstance(head, LogprobLMHead):
        # A parallelised model (issue 6): its own forward runs FSDP2's gather hooks, and its LM head
        # hands the gathered (under tp: this rank's vocabulary rows of the) weight to the fused kernel.
        rows_BT = torch.zeros_like(valid_BT)
        rows_BT[:, :-1] = valid_BT[:, 1:]
        request = LogprobRequest(rows_BT, targets_N, float(temperature), int(chunk_size), impl)
        with head.logprobs_of(request):  # the model's own call of its head gets the request
            logp_N, entropy_N = model(**inputs).logits.unbind(-1)
    else:
        base = getattr(model, model.base_model_prefix)
        hidden_NH = base(**inputs).last_hidden_state[:, :-1][valid_BT[:, 1:]]
        logp_N, entropy_N = chunked_linear_logprob_entropy(
            hidden_NH, weight_VH.to(hidden_NH.dtype), targets_N, temperature, chunk_size, impl
        )
    logp_BT = torch.zeros(mask_BT.shape, dtype=logp_N.dtype, device=logp_N.device)
    entropy_BT = torch.zeros_like(logp_BT)
    # index_put (out-of-place) keeps the graph from logp_N back to the model.
    logp_BT = logp_BT.index_put((valid_BT,), logp_N)
    entropy_BT = entropy_BT.index_put((valid_BT,), entropy_N)
    return logp_BT, entropy_BT
