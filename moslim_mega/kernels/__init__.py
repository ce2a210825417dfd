"""Fused Triton kernels, each beside its plain-PyTorch reference (issue 7).

- :mod:`.multihead_head`: the multi-head reward head — linear → per-head log-softmax → masked
  cross-entropy for training, and probabilities → Eq. 11 reward mapping for inference.
- :mod:`.linear_logprob`: linear → token log-prob and entropy over vocabulary chunks, with a
  vocab-parallel variant for a tensor-parallel LM head.

Triton is imported lazily by the kernel modules; :mod:`.dispatch` picks Triton on CUDA and the
reference elsewhere; an explicit ``impl=triton|reference`` wins, and where ``impl`` is None or
``auto`` (config ``kernels.impl``) the ``MOSLIM_KERNELS`` environment variable may force one.
"""

from .dispatch import IMPLS, KernelError, resolve_impl

__all__ = ["IMPLS", "KernelError", "resolve_impl"]
