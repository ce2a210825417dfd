"""Training engines behind one small interface (docs/architecture.md, STYLE.md §9).

:func:`build_engine` picks the engine of ``parallel.backend``: ``torch`` is
:class:`~moslim_mega.engine.torch_engine.TorchEngine`. ``engine/megatron/`` is the only place that
imports ``megatron.core``: the HF ⇄ Megatron checkpoint conversion and
:class:`~moslim_mega.engine.megatron.engine.MegatronEngine` (``build_megatron_engine``), which
implements this seam and is tested against plain torch (docs/megatron.md). The trainers do not run
it yet — it builds its own model from an HF directory and its checkpoints need megatron's
``dist_checkpointing`` — so ``megatron`` is refused here, before any model is built.
"""

from __future__ import annotations

from typing import Callable

from ..config import ConfigError, ParallelConfig
from .base import TrainEngine


def build_engine(parallel: ParallelConfig, build_model: Callable[[], object], make_updater: Callable[[object], object],
                 role: str, name: str, **kwargs) -> TrainEngine:
    """The training engine of ``parallel.backend`` for one model: ``build_model()`` builds (and
    shards) it, ``make_updater(model)`` gives its optimizer; ``kwargs`` go to the engine
    (``label``, ``temperature``, ``kernels``)."""
    if parallel.backend == "megatron":
        raise ConfigError("parallel.backend=megatron: the trainers cannot run the megatron engine yet (it is "
                          "usable through engine.megatron.engine.build_megatron_engine; trainer wiring and its "
                          "dist_checkpointing resume are missing, docs/megatron.md); use parallel.backend=torch")
    if parallel.backend != "torch":
        raise ConfigError(f"parallel.backend={parallel.backend}: expected torch or megatron")
    from .torch_engine import TorchEngine

    model = build_model()
    return TorchEngine(model, make_updater(model), role, name, **kwargs)
