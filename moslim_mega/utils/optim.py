"""The optimizer step every trainer shares: AdamW, linear warm-up (then constant, or linear
decay to a floor), gradient clipping, and a finite-gradient check that raises *before* any
parameter changes."""

from __future__ import annotations

import torch

from ..algos.core import NonFiniteError


def warmup_decay(warmup_steps: int, total_steps: int = 0, floor: float = 0.1):
    """LR multiplier: linear warm-up over ``warmup_steps``; then constant (total_steps = 0) or a
    linear decay reaching ``floor`` at ``total_steps``."""

    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if total_steps <= 0:
            return 1.0
        frac = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 1.0 - (1.0 - floor) * min(1.0, frac)

    return f


class Updater:
    def __init__(self, params, lr: float, weight_decay: float, warmup_steps: int, grad_clip: float, total_steps: int = 0):
        self.params = [p for p in params if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_decay(warmup_steps, total_steps))
        self.grad_clip = grad_clip
        # Sharded (FSDP2 / tensor-parallel) parameters: the global norm needs collectives.
        self.sharded = any(_is_dtensor(p) for p in self.params)

    @property
    def lr(self) -> float:
        return self.sched.get_last_lr()[0]

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self, step: int | None = None, what: str = "gradient norm") -> float:
        """Clip, check and apply; returns the pre-clip gradient norm."""
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        if self.sharded:
            from ..parallel.grad import clip_grad_norm_

            norm = clip_grad_norm_(self.params, max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if not bool(torch.isfinite(norm)):
            raise NonFiniteError(f"step {step}: {what} is not finite")
        self.opt.step()
        self.sched.step()
        return float(norm)


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)
