"""Atomic, resumable, sharded training checkpoints.

Layout of a checkpoint root (``checkpoint.dir``, default ``<stage out>/ckpt``)::

    step_12/              one checkpoint (step = optimizer/rollout steps completed)
      .metadata, *.distcp   torch.distributed.checkpoint shards of models + optimizers
      engine/<name>/        a model its engine saves itself (the megatron engine: megatron's
                            dist_checkpointing of the model and optimizer, its own .metadata)
      extra_rank<r>.json    per-rank RNG states and loop state (JSON, never a pickle)
      assets/<name>/        HF config, tokenizer, model.json (for `moslim export hf`)
      meta.json             step, world size, models, written last inside the directory
    step_16/
    latest                text file naming the newest complete checkpoint ("step_16")

A save writes everything into ``step_N.tmp``, renames it to ``step_N`` and only then replaces
``latest`` (temporary file + ``os.replace``); retention deletes old complete checkpoints last.
Saving a step that already exists (after resuming from an older checkpoint) first points
``latest`` at ``step_N.swap``, a hard-linked complete copy of the new checkpoint, if it named
the old ``step_N``; then replaces ``step_N``, points ``latest`` back at it and drops the copy.
A process killed at any moment therefore leaves ``latest`` naming a complete checkpoint (or no
``latest`` at all), and ``resume=auto`` never reads a half-written one. Left-over ``*.tmp`` /
``*.swap`` directories that ``latest`` does not name are removed by the next save.

Reading a checkpoint runs no pickle of ours (the loop state is JSON) and lets DCP unpickle only
what it needs: ``.metadata`` is checked against an allowlist of DCP's metadata classes and the
optimizers' non-tensor values are loaded with ``torch.load(weights_only=True)``, so a checkpoint
someone hands you (``checkpoint.resume=PATH``, ``moslim export hf``) cannot run code.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.api import CheckpointException

from ..parallel.dist import rank, world_size
from . import faults
from .state import (LoopStateError, apply_tensor_state, read_loop_state, rng_state, set_rng_state, tensor_state,
                    write_loop_state)

LATEST = "latest"
ENGINE_DIR = "engine"
"""Where a self-saving model item (``save_checkpoint(dir)`` / ``load_checkpoint(dir)``, e.g. the
megatron engine's ``MegatronCheckpoint``) writes, one directory per name. Such an item carries
its optimizer state too: it never appears in the DCP state dict."""
FORMAT_VERSION = 2
"""2: loop state in ``extra_rank<r>.json``. 1 (before): a pickled ``extra_rank<r>.pt``, refused."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, incomplete, other world size, bad setting)."""


def _no_dist() -> bool:
    """One process without a process group: tell DCP so (it would warn and assume it anyway)."""
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every single-process save/load; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        else:
            _fsync_dir(f)
    _fsync_dir(path)


def _link_tree(src: Path, dst: Path) -> None:
    """A durable copy of the complete checkpoint ``src`` at ``dst``: hard links (no data copied)
    where the file system has them, else copies."""
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
    _fsync_tree(dst)
    _fsync_dir(dst.parent)


def is_complete(path: Path) -> bool:
    return (path / "meta.json").is_file() and (path / ".metadata").is_file()


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from either the directory itself or a root holding ``latest``."""
    path = Path(path)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not is_complete(path):
        raise CheckpointError(f"{path}: not a complete checkpoint (no meta.json/.metadata, and no '{LATEST}' pointer)")
    return path


# What a DCP ``.metadata`` pickle may name: DCP's own metadata records and plain torch values.
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")
} | {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
     ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
     ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: Path, extra: set = frozenset()):
        super().__init__(file)
        self.where, self.extra = where, extra

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_METADATA_GLOBALS or (module, name) in self.extra or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.where}: refers to {module}.{name}, which is not DCP checkpoint metadata; "
                              "refusing to unpickle it (it could run code)")


# megatron's torch_dist writer also records each rank's DCP save plan in its ``.metadata``.
_DCP_PLAN_GLOBALS = {("torch.distributed.checkpoint.planner", name)
                     for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")}


def check_dcp_metadata(path: Path, allow_plans: bool = False) -> None:
    """Unpickle ``path/.metadata`` with only DCP's metadata classes allowed (and DCP's save-plan
    records with ``allow_plans``). DCP then reads the same bytes with plain ``pickle.load``, which
    can only build what this pass allowed."""
    meta = Path(path) / ".metadata"
    try:
        with open(meta, "rb") as fh:
            _MetadataUnpickler(fh, meta, _DCP_PLAN_GLOBALS if allow_plans else set()).load()
    except CheckpointError:
        raise
    except Exception as e:  # truncated or foreign bytes: any unpickling error
        raise CheckpointError(f"{meta}: not a readable DCP metadata file ({type(e).__name__}: {e})") from None


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's planner loads non-tensor values (optimizer hyper-parameters) with
    ``torch.load(weights_only=False)``; check each with ``weights_only=True`` first."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        data = value.read()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"checkpoint value {read_item.dest_index.fqn!r} is not plain data; refusing to "
                                  f"unpickle it ({_unsafe_global(e)})") from None
        super().load_bytes(read_item, io.BytesIO(data))


def _unsafe_global(e: Exception) -> str:
    """The line of torch's weights_only error that names the refused global."""
    lines = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
    return lines[0] if lines else type(e).__name__


def safe_dcp_load(state_dict: dict, path: Path, no_dist: bool) -> None:
    """``dcp.load`` of ``path`` into ``state_dict`` that unpickles only DCP metadata and plain data."""
    check_dcp_metadata(path)
    try:
        with quiet_single_process():
            dcp.load(state_dict, checkpoint_id=str(path), planner=WeightsOnlyLoadPlanner(), no_dist=no_dist)
    except CheckpointException as e:  # DCP wraps each rank's error; surface a refusal of ours as is
        ours = [exc for exc, _tb in e.failures.values() if isinstance(exc, CheckpointError)]
        if ours:
            raise ours[0] from None
        raise


def _split_self_saving(models: dict) -> tuple[dict, dict]:
    """({name: item that saves itself}, {name: module for DCP})."""
    own = {n: m for n, m in models.items() if hasattr(m, "save_checkpoint")}
    return own, {n: m for n, m in models.items() if n not in own}


class CheckpointManager:
    """Save every ``cfg.every`` steps into ``root``; resume per ``cfg.resume``; keep ``cfg.keep_last``."""

    def __init__(self, cfg, stage_out: str | Path):
        if cfg.every < 0 or cfg.keep_last < 0:
            raise CheckpointError(f"checkpoint.every={cfg.every}, checkpoint.keep_last={cfg.keep_last}: must be >= 0")
        if not cfg.resume:
            raise CheckpointError("checkpoint.resume: empty; use auto, never or a checkpoint path")
        self.cfg = cfg
        root = Path(cfg.dir) if cfg.dir else Path("ckpt")
        self.root = root if root.is_absolute() else Path(stage_out) / root

    # ---- saving ---------------------------------------------------------------------------
    def due(self, steps_done: int) -> bool:
        return self.cfg.every > 0 and steps_done % self.cfg.every == 0

    def save(self, steps_done: int, models: dict, optimizers: dict, extra: dict,
             assets: Callable[[Path], None] | None = None) -> Path:
        """Write checkpoint ``step_<steps_done>`` atomically (collective: every rank calls it).

        ``models`` {name: module}, ``optimizers`` {name: (module, optimizer)}: sharded through
        DCP. ``extra``: per-rank picklable loop state (RNG states are added here). ``assets(dir)``
        runs on rank 0 to write export files (see ``state.write_model_assets``).
        """
        final = self.root / f"step_{steps_done}"
        tmp = self.root / f"step_{steps_done}.tmp"
        if rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
            if tmp.exists():
                shutil.rmtree(tmp)  # a save that died earlier
            tmp.mkdir()
        _barrier()
        own, plain = _split_self_saving(models)
        with quiet_single_process():
            dcp.save(tensor_state(plain, optimizers), checkpoint_id=str(tmp), no_dist=_no_dist())
        for name, item in own.items():
            item.save_checkpoint(tmp / ENGINE_DIR / name)
        write_loop_state(tmp / f"extra_rank{rank()}.json", {**extra, "_global_rng": rng_state()})
        if rank() == 0 and assets is not None:
            assets(tmp)
        _barrier()
        if rank() == 0:
            meta = {"format_version": FORMAT_VERSION, "step": steps_done, "world_size": world_size(),
                    "models": sorted(models), "optimizers": sorted(optimizers)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            _fsync_tree(tmp)  # durable before the rename makes it "complete"
            faults.maybe_wait_for_kill("in_save", steps_done)
            self._publish(tmp, final)
            self._retain()
        _barrier()
        return final

    def _latest_name(self) -> str | None:
        pointer = self.root / LATEST
        return pointer.read_text().strip() if pointer.is_file() else None

    def _publish(self, tmp: Path, final: Path) -> None:
        """``tmp`` (complete) becomes ``final`` and ``latest`` names it; ``latest`` names a complete
        directory after every single step here."""
        if final.exists():  # the same step saved again (e.g. after a resume from an older one)
            if self._latest_name() == final.name:
                # latest must not name final while it is replaced: point it at a complete copy.
                swap = final.with_name(final.name + ".swap")
                if swap.exists():
                    shutil.rmtree(swap)
                _link_tree(tmp, swap)
                self._write_latest(swap.name)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        self._write_latest(final.name)
        self._remove_leftovers()

    def _remove_leftovers(self) -> None:
        """``*.swap`` copies that ``latest`` no longer names (a save was killed after its swap)."""
        latest = self._latest_name()
        for p in self.root.glob("step_*.swap"):
            if p.name != latest:
                shutil.rmtree(p)

    def _write_latest(self, name: str) -> None:
        tmp = self.root / f".{LATEST}.tmp"
        with open(tmp, "w") as fh:
            fh.write(name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / LATEST)
        _fsync_dir(self.root)

    def complete_checkpoints(self) -> list[Path]:
        """Complete ``step_N`` directories, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit() and is_complete(p):
                found.append((int(p.name[5:]), p))
        return [p for _, p in sorted(found)]

    def _retain(self) -> None:
        if self.cfg.keep_last <= 0:
            return
        latest = (self.root / LATEST).read_text().strip()
        for p in self.complete_checkpoints()[: -self.cfg.keep_last]:
            if p.name != latest:
                shutil.rmtree(p, ignore_errors=True)

    # ---- resuming -------------------------------------------------------------------------
    def resume_path(self) -> Path | None:
        """The checkpoint to resume from, per ``checkpoint.resume`` (None = start fresh)."""
        r = self.cfg.resume
        if r == "never":
            return None
        if r == "auto":
            pointer = self.root / LATEST
            if not pointer.is_file():
                return None
            path = self.root / pointer.read_text().strip()
            if not is_complete(path):
                raise CheckpointError(f"{pointer}: names {path.name}, which is not a complete checkpoint")
            return path
        return resolve_checkpoint(r)

    def load(self, path: Path, models: dict, optimizers: dict) -> dict:
        """Restore models, optimizers and global RNG states from ``path``; return the loop state."""
        meta = json.loads((path / "meta.json").read_text())
        if meta.get("format_version") == 1:
            raise CheckpointError(
                f"{path}: an older checkpoint (format_version 1) whose loop state is a pickle (extra_rank*.pt); "
                "resume no longer unpickles it, since that could run code. Start over "
                "(checkpoint.resume=never) or finish the run with the version that wrote it")
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}/meta.json: unsupported format_version {meta.get('format_version')!r}")
        if meta["world_size"] != world_size():
            raise CheckpointError(
                f"{path}: written by {meta['world_size']} process(es), resuming with {world_size()}; "
                "resume needs the same world size (export it with `moslim export hf` to change layout)")
        if sorted(models) != meta["models"] or sorted(optimizers) != meta["optimizers"]:
            raise CheckpointError(f"{path}: holds models {meta['models']} / optimizers {meta['optimizers']}, "
                                  f"this run has {sorted(models)} / {sorted(optimizers)}")
        try:
            extra = read_loop_state(path / f"extra_rank{rank()}.json")
        except (LoopStateError, OSError) as e:
            raise CheckpointError(str(e)) from None
        own, plain = _split_self_saving(models)
        for name in models:
            saved_by_engine = (path / ENGINE_DIR / name).is_dir()
            if saved_by_engine != (name in own):
                raise CheckpointError(
                    f"{path}: model {name!r} was saved {'by' if saved_by_engine else 'without'} its engine's own "
                    f"checkpoint format ({ENGINE_DIR}/{name}: parallel.backend=megatron), this run "
                    f"{'uses' if name in own else 'does not use'} it; resume with the parallel.backend that wrote it")
        sd = tensor_state(plain, optimizers)
        safe_dcp_load(sd, path, _no_dist())
        apply_tensor_state(sd, plain, optimizers)
        for name, item in own.items():
            check_dcp_metadata(path / ENGINE_DIR / name, allow_plans=True)
            item.load_checkpoint(path / ENGINE_DIR / name)
        set_rng_state(extra.pop("_global_rng"))
        return extra
