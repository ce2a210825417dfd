"""Training engines behind one small interface (docs/architecture.md, STYLE.md §9).

:func:`build_engine` picks the engine of ``parallel.backend``: ``torch`` is
:class:`~moslim_mega.engine.torch_engine.TorchEngine`, or under ``parallel.pp > 1``
:class:`~moslim_mega.engine.pipeline.PipelineEngine`. ``engine/megatron/`` is the only place that
imports ``megatron.core``: the HF ⇄ Megatron checkpoint conversion and
:class:`~moslim_mega.engine.megatron.engine.MegatronEngine` (``build_megatron_engine``), which
implements this seam and is tested against plain torch (docs/megatron.md). The trainers do not run
it yet — it builds its own model from an HF directory and its checkpoints need megatron's
``dist_checkpointing`` — so ``megatron`` is refused here, before any model is built.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import ConfigError, KernelsConfig, ParallelConfig
from .base import MicroBatch, TrainEngine


def build_engine(parallel: ParallelConfig, build_model: Callable[[], object], make_updater: Callable[[object], object],
                 role: str, name: str, stage=None, optim: dict | None = None, **kwargs) -> TrainEngine:
    """The training engine of ``parallel.backend`` for one model: ``build_model()`` builds (and
    shards) it, ``make_updater(model)`` gives its optimizer; ``kwargs`` go to the engine
    (``label``, ``temperature``, ``kernels``).

    Under ``parallel.pp > 1`` the model comes from ``stage.build`` (parallel/stage.py: a meta
    skeleton, the real weights on rank 0) and ``optim`` holds the ``Updater`` keywords (lr,
    weight_decay, warmup_steps, grad_clip, total_steps): the pipeline engine makes its own updater
    over this rank's stages, whose gradient norm spans the pp group. A trainer that passes neither
    does not run the pipeline engine and is refused here rather than train a full copy per rank.
    A frozen, forward-only pipeline model (the policy's reference and RM) passes ``optim=None`` and
    ``train=False`` (no float8, no activation checkpointing); it is pipeline-only: without pp a
    frozen model needs no engine."""
    if parallel.backend == "megatron":
        raise ConfigError("parallel.backend=megatron: the trainers cannot run the megatron engine yet (it is "
                          "usable through engine.megatron.engine.build_megatron_engine; trainer wiring and its "
                          "dist_checkpointing resume are missing, docs/megatron.md); use parallel.backend=torch")
    if parallel.backend != "torch":
        raise ConfigError(f"parallel.backend={parallel.backend}: expected torch or megatron")
    if parallel.pp > 1:
        return _pipeline_engine(parallel, build_model, role, name, stage, optim, **kwargs)
    from .torch_engine import TorchEngine

    model = build_model()
    return TorchEngine(model, make_updater(model), role, name, **kwargs)


def _pipeline_engine(parallel, build_model, role: str, name: str, stage, optim, label: str | None = None,
                     temperature: float = 1.0, kernels: KernelsConfig | None = None, train: bool = True) -> TrainEngine:
    if stage is None or (optim is None and train):
        raise ConfigError(f"parallel.pp={parallel.pp}: the {label or name} trainer does not run the pipeline "
                          "engine (engine/pipeline.py); use parallel.pp=1")
    from .pipeline import PipelineEngine

    kc = kernels or KernelsConfig()
    model = build_model()
    engine = PipelineEngine(model, role, stage.mesh, parallel, optim=optim, name=name, label=label,
                            temperature=temperature if temperature > 0 else 1.0, logprob_chunk=kc.logprob_chunk,
                            kernels_impl=kc.impl, train=train, _rank0_model=stage.rank0_model(model))
    stage.adopt(model, engine)
    return engine


def micro_batch_count(parallel: ParallelConfig) -> int:
    """How many micro-batches a trainer cuts each step's (dp shard of the) batch into: one without
    pipelining (gradient accumulation is not asked for), else ``parallel.pp_microbatches`` or, when
    0, one per pipeline stage — the fewest that keep every stage busy in the steady state."""
    if parallel.pp <= 1:
        return 1
    return parallel.pp_microbatches or parallel.pp


def split_rows(micro: MicroBatch, n: int) -> list[MicroBatch]:
    """``micro`` cut into ``n`` contiguous row ranges (sizes differ by at most one; some are empty
    when there are fewer rows than ``n``: their losses must then be 0, not a mean over nothing)."""
    if n == 1:
        return [micro]
    parts = {k: torch.tensor_split(v, n) for k, v in micro.items()}
    return [{k: parts[k][i] for k in micro} for i in range(n)]
