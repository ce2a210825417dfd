"""Which implementation a fused kernel runs: ``triton`` or the plain-PyTorch ``reference``.

``auto`` (default) picks Triton for CUDA tensors when triton imports, the reference otherwise.
The choice comes from the ``impl`` argument (``kernels.impl`` in the config); where that is None
or ``auto``, the ``MOSLIM_KERNELS`` environment variable may still force one (e.g. to A/B a run
without editing its recipe). An explicit ``triton`` / ``reference`` argument wins over the variable.
Triton on CPU tensors runs only in interpreter mode (``TRITON_INTERPRET=1`` set before
``import triton``), which is how the CPU test suite exercises the kernel code itself.

Public API: :class:`KernelError`, :func:`resolve_impl`, :data:`IMPLS`.
"""

from __future__ import annotations

import os

import torch

__all__ = ["IMPLS", "KernelError", "resolve_impl", "triton_available"]

IMPLS = ("auto", "triton", "reference")
ENV_VAR = "MOSLIM_KERNELS"


class KernelError(ValueError):
    """Bad input to a fused kernel; the message names the argument."""


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """``triton`` or ``reference`` for tensors on ``device``; raises KernelError if impossible."""
    from_env = impl in (None, "auto") and os.environ.get(ENV_VAR, "auto") != "auto"
    source = ENV_VAR if from_env or impl is None else "impl"
    choice = os.environ.get(ENV_VAR) if from_env else (impl or "auto")
    if choice not in IMPLS:
        raise KernelError(f"{source}: {choice!r} is not one of {IMPLS}")
    if choice == "reference":
        return "reference"
    usable = triton_available() and (device.type == "cuda" or _interpreting())
    if choice == "auto":
        return "triton" if usable and device.type == "cuda" else "reference"
    if not triton_available():
        raise KernelError(f"{source}: 'triton' requested but triton is not installed (pip install 'triton>=3.0')")
    if not usable:
        raise KernelError(
            f"{source}: 'triton' on a {device.type} tensor needs CUDA, or TRITON_INTERPRET=1 set before import triton"
        )
    return "triton"
