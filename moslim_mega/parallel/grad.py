"""Global gradient-norm clipping over plain tensors and DTensors on any mesh.

A DTensor's squared norm is summed over the mesh dimensions it is *sharded* on (each shard holds
a different part) and not over the dimensions it is replicated on (each replica holds the same
numbers). Plain-tensor gradients are replicated on every rank that holds them (TP-replicated norms
and heads), so they count once. Under pipeline parallelism the ranks of a ``pp`` group hold
*different* parameters (their stages), so the squared norm is also summed over ``sum_groups``. The
result is the norm of the full, unsharded gradient — the same number a single process computes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate


def _local_sq(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().pow(2).sum()


def total_grad_norm(params, sum_groups=()) -> torch.Tensor:
    """The L2 norm of all gradients (float32 scalar, identical on every rank). ``sum_groups``:
    process groups whose ranks hold disjoint parameters (pipeline stages)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        if not sum_groups:
            return torch.zeros(())
        grads = [torch.zeros(())]  # a stage without gradients still joins the pp all-reduce
    plain = [g for g in grads if not isinstance(g, DTensor)]
    device = grads[0].to_local().device if isinstance(grads[0], DTensor) else grads[0].device
    total = sum((_local_sq(g) for g in plain), torch.zeros((), device=device))
    by_mesh: dict = {}
    for g in grads:
        if isinstance(g, DTensor):
            # Shard and FSDP2's _StridedShard (FSDP over a TP-sharded dim) both split the tensor;
            # a gradient is never left Partial after FSDP's reduce-scatter / TP's backward.
            assert not any(isinstance(pl, Partial) for pl in g.placements), g.placements
            dims = tuple(i for i, pl in enumerate(g.placements) if not isinstance(pl, Replicate))
            key = (id(g.device_mesh), dims)
            mesh, acc = by_mesh.get(key, (g.device_mesh, torch.zeros((), device=device)))
            by_mesh[key] = (mesh, acc + _local_sq(g.to_local()))
    # Insertion order follows parameter order, which is the same on every rank: the collectives match.
    for (_, dims), (mesh, acc) in by_mesh.items():
        for d in dims:
            dist.all_reduce(acc, group=mesh.get_group(d))
        total = total + acc
    for group in sum_groups:
        dist.all_reduce(total, group=group)
    return total.sqrt()


def clip_grad_norm_(params, max_norm: float, sum_groups=()) -> torch.Tensor:
    """Scale all gradients so their global norm is at most ``max_norm``; returns the pre-clip norm."""
    params = [p for p in params if p.grad is not None]
    norm = total_grad_norm(params, sum_groups)
    if max_norm != float("inf"):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # as torch.nn.utils.clip_grad_norm_
        for p in params:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(coef.to(g.device, g.dtype))
    return norm
