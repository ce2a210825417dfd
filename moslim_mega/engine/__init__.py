"""Training engines behind one small interface (docs/architecture.md, STYLE.md §9).

:func:`build_engine` picks the engine of ``parallel.backend``: ``torch`` is
:class:`~moslim_mega.engine.torch_engine.TorchEngine`, or under ``parallel.pp > 1``
:class:`~moslim_mega.engine.pipeline.PipelineEngine`. ``engine/megatron/`` is the only place that
imports ``megatron.core``: the HF ⇄ Megatron checkpoint conversion and
:class:`~moslim_mega.engine.megatron.engine.MegatronEngine` (``build_megatron_engine``), which
implements this seam. ``parallel.backend=megatron`` runs it for the trainers that pass ``init_dir``:
``moslim sft train`` and ``moslim rm train``, whose model, built as for the torch backend on rank 0,
is written there as an HF (RM) directory that every rank's engine loads its shards from, and the
policy controller's actor and PPO critic, loaded from ``policy.init`` as it is. The engine checkpoints through
megatron's ``dist_checkpointing`` (``MegatronCheckpoint``). Other trainers (the regression RM
baseline, DPA's SFT iterations) are refused before any model is built.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..config import ConfigError, KernelsConfig, ParallelConfig
from .base import MicroBatch, TrainEngine


def build_engine(parallel: ParallelConfig, build_model: Callable[[], object], make_updater: Callable[[object], object],
                 role: str, name: str, stage=None, optim: dict | None = None, init_dir=None,
                 **kwargs) -> TrainEngine:
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
    frozen model needs no engine.

    ``parallel.backend=megatron`` needs ``stage``, ``optim`` and ``init_dir``: a directory in the
    run's output where rank 0 writes the starting model for the engine to load (SFT, RM), or the
    HF directory the engine loads as it is (the policy's actor)."""
    if parallel.backend == "megatron":
        return _megatron_engine(parallel, build_model, role, name, stage, optim, init_dir, **kwargs)
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


def _megatron_engine(parallel, build_model, role: str, name: str, stage, optim, init_dir, label: str | None = None,
                     temperature: float = 1.0, kernels: KernelsConfig | None = None, train: bool = True) -> TrainEngine:
    if stage is None or optim is None or init_dir is None or not train:
        raise ConfigError(f"parallel.backend=megatron: the {label or name} trainer does not run the megatron engine "
                          "(moslim sft train, rm train and policy train do); use parallel.backend=torch")
    if not stage.distributed:
        raise ConfigError("parallel.backend=megatron: needs torchrun (megatron-core sets up its tensor/pipeline groups "
                          "on torch.distributed), e.g. torchrun --nproc_per_node=2 -m moslim_mega.cli ...")
    from pathlib import Path

    from .megatron.engine import EngineSettings, build_megatron_engine

    init_dir = Path(init_dir)
    # SFT / RM: Stage.build's meta skeleton, rank 0 also holding the real model, which is written to
    # init_dir. The policy: a skeleton of the HF directory init_dir, which the engine loads as it is.
    skeleton = build_model()
    full = stage.rank0_model(skeleton)
    if full is not None:
        # The engine loads from files (the converter's mapping, tensor by tensor); the trainer's
        # model may be a random tiny one, or a checkpoint whose vocabulary build_* resized, so what
        # is written is the model as the torch backend would start training it, not its source.
        _write_init(full, role, init_dir)
        _copy_buffers(full, skeleton)  # rank 0 saves the final model from the skeleton (Stage.full_model)
        del full
    stage.barrier()
    kc = kernels or KernelsConfig()
    settings = EngineSettings(lr=optim["lr"], weight_decay=optim["weight_decay"], warmup_steps=optim["warmup_steps"],
                              total_steps=optim.get("total_steps", 0), grad_clip=optim["grad_clip"],
                              temperature=temperature if temperature > 0 else 1.0, logprob_chunk=kc.logprob_chunk)
    engine = build_megatron_engine(parallel, init_dir, role, settings, name=name)
    ours = {"dp": (stage.dp_rank, stage.dp), "pp": (stage.pp_rank(), stage.pp)}
    if engine.parallel_ranks() != ours:
        # The trainer shards data by its mesh and gathers the loss over its mesh's dp group; both
        # lay ranks out tp-fastest, dp, then pp, so they agree — checked, since a mismatch would
        # silently train on the wrong rows.
        raise ConfigError(f"parallel.backend=megatron: megatron's ranks {engine.parallel_ranks()} differ from the "
                          f"trainer's mesh {ours}")
    stage.adopt(skeleton, engine if role == "causal_lm" else _ModuleNames(engine))
    return engine


def _write_init(full, role: str, path) -> None:
    """The engine's input format: an HF directory (causal_lm), or the parts of a reward-model
    directory ``MegatronEngine.from_pretrained`` reads (``rm.json``'s class counts,
    ``backbone/``, ``heads.safetensors``; not a complete RM directory for ``load_reward_model``)."""
    import json
    import shutil

    from safetensors.torch import save_file

    if path.exists():
        if not (path / _INIT_MARK).is_file():
            raise ConfigError(f"{path}: exists and was not written by the megatron backend (no {_INIT_MARK}); "
                              "refusing to replace it")
        shutil.rmtree(path)  # a resumed run writes it again: the engine loads it, then the checkpoint
    if role == "causal_lm":
        full.save_pretrained(path, safe_serialization=True)
    else:
        full.backbone.save_pretrained(path / "backbone", safe_serialization=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in full.heads.state_dict().items()},
                  path / "heads.safetensors")
        (path / "rm.json").write_text(json.dumps({"num_classes": list(full.num_classes)}))
    (path / _INIT_MARK).write_text("the starting model of a parallel.backend=megatron run (engine/__init__.py)\n")


_INIT_MARK = ".moslim_megatron_init"


def _copy_buffers(full, skeleton) -> None:
    """Buffers (RoPE's inverse frequencies) are no parameters the engine exports; the meta
    skeleton gets rank 0's real ones so ``Stage.full_model`` can copy them."""
    for name, buf in full.named_buffers():
        owner_name, _, attr = name.rpartition(".")
        owner = skeleton.get_submodule(owner_name) if owner_name else skeleton
        owner._buffers[attr] = buf.detach().clone().cpu()


class _ModuleNames:
    """The reward (value) engine's ``export_weights`` under ``MultiHeadRewardModel``'s
    (``ValueModel``'s) parameter names, which ``Stage.full_model`` loads into the module: the
    engine's HF backbone names get ``backbone.``."""

    def __init__(self, engine):
        self.engine = engine

    def export_weights(self, bucket_bytes: int = 1 << 28):
        for name, tensor in self.engine.export_weights(bucket_bytes):
            yield (name if name.startswith(("heads.", "value_head.")) else "backbone." + name), tensor


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
