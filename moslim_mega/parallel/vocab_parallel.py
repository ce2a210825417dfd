"""Token log-probs and entropies over a tensor-parallel (vocabulary-sharded) LM head.

Legend: N rows (tokens), V vocabulary, Vl = this tp rank's vocabulary slice [start, start + Vl).
z = logits / temperature (local slice), logZ = logsumexp over the *global* vocabulary.

Nothing of size N×V is ever gathered: each rank reduces its slice to three numbers per row that
are all-reduced over the tp group — the max (for stability), Σ exp(z − m) and Σ exp(z − m)·z —
plus the target's logit (found on exactly one rank, zero elsewhere). Then
log p(t) = z_t − logZ and entropy = logZ − E_p[z]. Backward is local to each slice:
dL/dz_j = g_lp·(1[j = t] − p_j) − g_H·p_j·(z_j − E_p[z]).

``parallel_info(model)`` tells :func:`moslim_mega.algos.logprob.sequence_logprobs` that a model was
parallelised (and whether its logits come back vocab-sharded); it then takes the logits from the
model's own forward, so FSDP2's gather/reshard hooks run as usual.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


class _VocabParallelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z_NV: Tensor, targets_N: Tensor, vocab_start: int, group):
        z_NV = z_NV.float()
        vl = z_NV.shape[1]
        max_N = z_NV.amax(dim=1)
        dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=group)
        e_NV = torch.exp(z_NV - max_N[:, None])
        sums_2N = torch.stack([e_NV.sum(dim=1), (e_NV * z_NV).sum(dim=1)])
        in_shard_N = (targets_N >= vocab_start) & (targets_N < vocab_start + vl)
        local_N = (targets_N - vocab_start).clamp(0, vl - 1)
        target_N = torch.where(in_shard_N, z_NV.gather(1, local_N[:, None]).squeeze(1), torch.zeros_like(max_N))
        packed_3N = torch.cat([sums_2N, target_N[None]])  # one all-reduce for the three sums
        dist.all_reduce(packed_3N, group=group)
        sum_N, zsum_N, target_N = packed_3N
        logz_N = max_N + torch.log(sum_N)
        mean_z_N = zsum_N / sum_N
        ctx.save_for_backward(z_NV, logz_N, mean_z_N, in_shard_N, local_N)
        ctx.set_materialize_grads(False)
        return target_N - logz_N, logz_N - mean_z_N

    @staticmethod
    def backward(ctx, grad_logp_N, grad_entropy_N):
        z_NV, logz_N, mean_z_N, in_shard_N, local_N = ctx.saved_tensors
        p_NV = torch.exp(z_NV - logz_N[:, None])
        grad_NV = torch.zeros_like(z_NV)
        if grad_logp_N is not None:
            grad_NV -= grad_logp_N[:, None] * p_NV
            rows = torch.nonzero(in_shard_N).squeeze(1)
            grad_NV[rows, local_N[rows]] += grad_logp_N[rows]
        if grad_entropy_N is not None:
            grad_NV -= grad_entropy_N[:, None] * p_NV * (z_NV - mean_z_N[:, None])
        return grad_NV, None, None, None


def vocab_parallel_logprob_entropy(z_NV: Tensor, targets_N: Tensor, vocab_start: int, group=None) -> tuple[Tensor, Tensor]:
    """(log p(target), entropy) from this rank's vocabulary slice ``z_NV`` of the scaled logits.
    ``targets_N`` are global token ids; every rank of ``group`` passes the same targets."""
    return _VocabParallelLogprob.apply(z_NV, targets_N.long(), int(vocab_start), group)


def full_logprob_entropy(z_NV: Tensor, targets_N: Tensor) -> tuple[Tensor, Tensor]:
    """The same from unsharded logits (float32)."""
    logp_NV = torch.log_softmax(z_NV.float(), dim=-1)
    return logp_NV.gather(1, targets_N.long()[:, None]).squeeze(1), -(logp_NV.exp() * logp_NV).sum(-1)


@dataclass(frozen=True)
class ParallelLMInfo:
    """How a parallelised causal LM returns its logits: vocab-sharded over ``tp_group`` or whole."""

    tp_group: object = None
    vocab_start: int = 0

    def logprob_entropy(self, z_NV: Tensor, targets_N: Tensor) -> tuple[Tensor, Tensor]:
        if self.tp_group is None:
            return full_logprob_entropy(z_NV, targets_N)
        return vocab_parallel_logprob_entropy(z_NV, targets_N, self.vocab_start, self.tp_group)


_REGISTRY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def register_parallel_lm(model, info: ParallelLMInfo) -> None:
    _REGISTRY[model] = info


def parallel_info(model) -> ParallelLMInfo | None:
    """Set by ``parallelize_policy``; None for a plain single-process model."""
    return _REGISTRY.get(model)


def vocab_shard_start(vocab_size: int, tp_rank: int, tp: int) -> int:
    """First token id of a tp rank's slice under DTensor's Shard(0) (torch.chunk: ceil-sized pieces)."""
    return min(vocab_size, tp_rank * (-(-vocab_size // tp)))
