"""Test-only: run megatron-core 0.16.1's GPTModel and its pipeline schedules on CPU (gloo, fp32).

megatron-core assumes CUDA in a handful of places that do not change the numbers; this shim
redirects them to the CPU for the duration of :func:`cpu_megatron` and undoes every patch on exit.
No product code imports it (tests/engine/megatron/test_isolation.py walks moslim_mega/ only,
and the engine runs unpatched on a GPU). Pinned: each patch was read against 0.16.1's source; on
another version :func:`require_pinned` skips the calling test with the reason.

The patches, and why each is harmless to the numbers:

1. ``torch.cuda.current_device()`` → ``"cpu"``: RoPE's ``inv_freq``, the global memory buffer
   (the all-gather scratch of sequence parallelism) and p2p's shape tensors are *placed* with it.
2. ``torch.cuda.synchronize()`` → no-op: p2p waits for its CUDA stream (gloo is synchronous).
3. ``torch.Tensor.cuda()`` → identity: ``GPTModel`` moves the last stage's copy of tied
   embeddings to the GPU before all-reducing it with the first stage.
4. ``tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)``:
   the public no-op tracker (``fork()`` is a null context), since the training tracker saves and
   restores ``torch.cuda`` RNG states. Only dropout forks it, and every dropout here is 0.
5. the module-level ``torch`` of :data:`CUDA_LITERAL_MODULES` → a proxy whose ``zeros`` /
   ``tensor`` / ``empty`` / ``ones`` turn ``device="cuda"`` into CPU: the schedules count tokens,
   and the fp32 optimizer keeps its (constant 1) loss scale, in CUDA tensors.
6. ``tensor_parallel.random._get_cuda_rng_state`` → None and ``_set_cuda_rng_state`` → no-op:
   full recomputation (``tensor_parallel.checkpoint``) saves and restores the CPU, CUDA and
   tracker RNG states around each recomputed layer; there is no CUDA generator here, and the CPU
   state (still saved and restored) is the only one a CPU run draws from (and no dropout draws).
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch

PINNED = "0.16.1"
# Modules that create small bookkeeping tensors with a literal device="cuda" (token counts, the
# fp32 optimizer's loss scale of 1, the grad-norm buffers of the clip and its local l2 norm).
CUDA_LITERAL_MODULES = ("pipeline_parallel.schedules", "optimizer.optimizer", "optimizer.clip_grads", "utils")


def require_pinned():
    """``megatron.core`` at the pinned version, else skip the test with the reason."""
    mcore = pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")
    if mcore.__version__ != PINNED:
        pytest.skip(f"cpu_shim is pinned to megatron-core {PINNED} (installed: {mcore.__version__}); "
                    "re-read its six patches against the new source before bumping the pin")
    return mcore


def _cpu_device(kwargs: dict) -> dict:
    dev = kwargs.get("device")
    if dev is not None and torch.device(dev).type == "cuda":
        kwargs = {**kwargs, "device": "cpu"}
    return kwargs


def _torch_proxy() -> types.ModuleType:
    proxy = types.ModuleType("torch_cpu_proxy")
    proxy.__dict__.update({k: v for k, v in torch.__dict__.items() if not k.startswith("__")})
    for name in ("zeros", "tensor", "empty", "ones"):
        real = getattr(torch, name)
        setattr(proxy, name, lambda *a, _real=real, **k: _real(*a, **_cpu_device(k)))
    return proxy


@contextlib.contextmanager
def cpu_megatron():
    """Apply the six patches; restore them on exit."""
    import importlib

    from megatron.core.tensor_parallel import random as mp_random

    modules = [importlib.import_module(f"megatron.core.{name}") for name in CUDA_LITERAL_MODULES]
    saved = [(torch.cuda, "current_device", torch.cuda.current_device),
             (torch.cuda, "synchronize", torch.cuda.synchronize),
             (torch.Tensor, "cuda", torch.Tensor.cuda),
             (mp_random, "_get_cuda_rng_state", mp_random._get_cuda_rng_state),
             (mp_random, "_set_cuda_rng_state", mp_random._set_cuda_rng_state)] + [(m, "torch", m.torch) for m in modules]
    try:
        torch.cuda.current_device = lambda: "cpu"
        torch.cuda.synchronize = lambda *a, **k: None
        torch.Tensor.cuda = lambda self, *a, **k: self
        mp_random._get_cuda_rng_state = lambda *a, **k: None
        mp_random._set_cuda_rng_state = lambda *a, **k: None
        proxy = _torch_proxy()
        for m in modules:
            m.torch = proxy
        mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        mp_random.initialize_rng_tracker(force_reset=True)
