"""The LM head of a parallelised causal LM: token log-probs and entropies straight from its weight.

Legend: B batch, T tokens, N rows (tokens with a target), H hidden size, V vocabulary, Vs = this tp
rank's vocabulary rows [start, start + Vs).

``parallelize_policy`` swaps the model's ``nn.Linear`` LM head for :class:`LogprobLMHead` (same
parameter, same state-dict name). Called plainly it returns logits — under tensor parallel only
this rank's vocabulary slice, as Megatron's column-parallel head with "parallel output". Called
with a :class:`LogprobRequest` (``head(hidden_BTH, request=...)``: rows, targets, temperature,
vocabulary chunk size, kernel impl) it instead hands the hidden states and the gathered weight to
the fused linear → log-prob kernel of issue 7, and returns ``[N, 2]`` = (log p(target), entropy):
the N×V (or N×Vs) logits never exist. The model's own forward calls its head with the hidden
states only, so :func:`moslim_mega.algos.logprob.sequence_logprobs` runs that forward (FSDP2's
gather/reshard hooks run as usual) inside ``head.logprobs_of(request)``, which adds the request
to that one call's arguments; a caller that holds the hidden states (a pipeline's last stage)
calls the head with the request itself. Under tensor
parallel that is the vocab-parallel kernel: each rank reduces its Vs rows to a per-row online-
softmax state, two collectives (all-reduce MAX, then SUM) combine the states, and in backward the
partial hidden gradient is all-reduced.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..config import ConfigError
from ..kernels.linear_logprob import fused_linear_logprob, vocab_parallel_linear_logprob


class _CopyToGroup(torch.autograd.Function):
    """Identity forward, all-reduce (SUM) backward: the input of a column-parallel linear."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


@dataclass(frozen=True)
class LogprobRequest:
    """What :class:`LogprobLMHead` computes instead of logits: log p(``targets_N``) and the entropy of
    the rows ``hidden_BTH[rows_BT]`` (row-major order), over vocabulary chunks of ``chunk_size``."""

    rows_BT: Tensor  # which positions' hidden states predict a target
    targets_N: Tensor
    temperature: float
    chunk_size: int
    impl: str | None  # kernels.impl: triton | reference | None/auto


class LogprobLMHead(nn.Linear):
    """A bias-free LM head that can return fused token log-probs and entropies instead of logits."""

    @contextmanager
    def logprobs_of(self, request: LogprobRequest):
        """While open, the model's own call ``lm_head(hidden_BTH)`` gets ``request=request`` added
        (a forward pre-hook, removed on exit), so it returns the request's ``[N, 2]`` float32."""

        def add_request(_module, args, kwargs):
            return args, {**kwargs, "request": request}

        handle = self.register_forward_pre_hook(add_request, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _local_weight(self) -> tuple[Tensor, object, int]:
        """(this rank's rows of W, tp group or None, first vocabulary id of those rows)."""
        weight = self.weight
        if not isinstance(weight, DTensor):
            return weight, None, 0
        mesh = weight.device_mesh
        if mesh.ndim != 1:
            raise ConfigError(f"LM head weight on a {mesh.ndim}-D mesh inside forward; expected the tp mesh")
        start = vocab_shard_start(self.out_features, mesh.get_local_rank(), mesh.size())
        return weight.to_local(), mesh.get_group(), start

    def forward(self, hidden_BTH: Tensor, request: LogprobRequest | None = None) -> Tensor:
        """Logits ``[B, T, V]`` (under tp: ``[B, T, Vs]``), or with ``request`` its ``[N, 2]``
        (log p(target), entropy) in float32."""
        weight, group, start = self._local_weight()
        if request is None:
            if group is not None:  # each rank's logits slice feeds back a partial input gradient
                hidden_BTH = _CopyToGroup.apply(hidden_BTH, group)
            return F.linear(hidden_BTH, weight)
        hidden_NH = hidden_BTH[request.rows_BT]
        weight = weight.to(hidden_NH.dtype)  # as sequence_logprobs' plain path (a no-op under FSDP2's cast)
        if group is None:
            logp_N, entropy_N = fused_linear_logprob(
                hidden_NH, weight, request.targets_N, request.temperature, chunk_size=request.chunk_size,
                impl=request.impl,
            )
        else:
            logp_N, entropy_N = vocab_parallel_linear_logprob(
                hidden_NH, weight, request.targets_N, group, vocab_start=start, vocab_size=self.out_features,
                temperature=request.temperature, chunk_size=request.chunk_size, impl=request.impl,
            )
        return torch.stack([logp_N, entropy_N], dim=-1)


def install_logprob_head(model) -> LogprobLMHead:
    """Swap ``model``'s ``nn.Linear`` LM head for a :class:`LogprobLMHead` holding the same weight
    (tied embeddings stay tied; state-dict names do not change). Run before tp / FSDP2."""
    head = model.get_output_embeddings()
    if isinstance(head, LogprobLMHead):
        return head
    if type(head) is not nn.Linear or head.bias is not None:
        raise ConfigError(f"LM head {type(head).__name__}: the parallel policy needs a bias-free nn.Linear head")
    name = next(n for n, m in model.named_children() if m is head)
    new = LogprobLMHead(head.in_features, head.out_features, bias=False, device="meta")
    new.weight = head.weight
    setattr(model, name, new)
    return new


def vocab_shard_start(vocab_size: int, tp_rank: int, tp: int) -> int:
    """First token id of a tp rank's slice under DTensor's Shard(0) (torch.chunk: ceil-sized pieces)."""
    return min(vocab_size, tp_rank * (-(-vocab_size // tp)))
