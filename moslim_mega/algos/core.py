"""Masked reductions and the finiteness guard shared by every RL algorithm.

Legend: B batch (sequences), T tokens. Masks are 0/1 (bool or float) and select the entries that
count; masked-out entries may hold anything (padding, NaN from a padded position) and never leak
into a result, because they are removed with ``torch.where`` rather than multiplied by 0
(``NaN * 0`` is still NaN).

Public API: :func:`masked_sum`, :func:`masked_mean`, :func:`masked_var`, :func:`masked_whiten`,
:func:`check_finite`, :class:`AlgoError`, :class:`NonFiniteError`.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["AlgoError", "NonFiniteError", "masked_sum", "masked_mean", "masked_var", "masked_whiten", "check_finite"]


class AlgoError(ValueError):
    """Bad input to an RL algorithm function; the message names the argument."""


class NonFiniteError(RuntimeError):
    """A training quantity (reward, advantage, loss) became NaN or Inf."""


def check_same_shape(**tensors: Tensor) -> None:
    """Raise :class:`AlgoError` naming the first argument whose shape differs from the first one."""
    items = list(tensors.items())
    name0, t0 = items[0]
    for name, t in items[1:]:
        if t.shape != t0.shape:
            raise AlgoError(f"{name}: shape {tuple(t.shape)} does not match {name0} shape {tuple(t0.shape)}")


def _where_mask(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(x with masked-out entries set to 0 and weighted by the mask, mask as x's dtype)."""
    if mask.shape != x.shape:
        mask = mask.expand_as(x)  # a broadcastable mask is fine; a wrong one raises here
    m = mask.to(x.dtype)
    return torch.where(mask != 0, x * m, torch.zeros((), dtype=x.dtype, device=x.device)), m


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ x over entries with mask ≠ 0 (over all entries if ``dim`` is None)."""
    xm, _ = _where_mask(x, mask)
    return xm.sum() if dim is None else xm.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over entries with mask ≠ 0. An all-masked slice gives 0 (not NaN), so a batch
    without any response token yields a zero loss instead of poisoning the optimiser state."""
    xm, m = _where_mask(x, mask)
    if dim is None:
        return xm.sum() / m.sum().clamp(min=1e-8)
    return xm.sum(dim) / m.sum(dim).clamp(min=1e-8)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all entries with mask ≠ 0 (Bessel-corrected when ``unbiased``)."""
    n = float(mask.to(torch.float64).sum())
    if n < (2 if unbiased else 1):
        raise AlgoError(f"mask: variance needs at least {2 if unbiased else 1} valid entries, got {n:g}")
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return var * (n / (n - 1)) if unbiased else var


def masked_whiten(x_BT: Tensor, mask_BT: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the masked entries (unbiased variance, as verl/TRL); with
    ``shift_mean=False`` the mean is added back, so only the scale changes. Masked-out → 0."""
    check_same_shape(x_BT=x_BT, mask_BT=mask_BT)
    mean = masked_mean(x_BT, mask_BT)
    var = masked_var(x_BT, mask_BT, unbiased=True)
    out = (x_BT - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask_BT != 0, out, torch.zeros((), dtype=out.dtype, device=out.device))


def check_finite(tensor: Tensor, what: str, step: int) -> None:
    """Raise :class:`NonFiniteError` if any entry of ``tensor`` is NaN or ±Inf.

    Called by the controller on rewards, advantages and losses so a divergence stops the run at the
    step where it happened rather than many steps later in the optimiser state.
    """
    if not bool(torch.isfinite(torch.as_tensor(tensor)).all()):
        raise NonFiniteError(f"step {step}: {what} is not finite")
