"""Write and read megatron-core ``dist_checkpointing`` checkpoints (the ``torch_dist`` backend)
one tensor at a time.

The format (megatron-core 0.16, what ``GPTModel.sharded_state_dict()`` saves): a PyTorch
Distributed Checkpoint (``.metadata`` + ``*.distcp``) whose keys hold global tensors with the layer
— and, for experts, the expert — index as leading axes, plus ``metadata.json`` (backend names)
and ``common.pt`` (the non-sharded state). Any layout loads it: DCP reads each rank's slice.

Writing: megatron's own ``dist_checkpointing.save`` needs the whole state dict in memory (and CUDA
for its synchronisation), so the writer plans the checkpoint from shapes alone and makes each
tensor only when DCP's writer asks for it (``SavePlanner.resolve_data``, DCP's documented hook):
one layer's (one expert's) tensor at a time, written, dropped. Each chunk is one layer (one
expert) — a valid grid that megatron's reader reshards like any other.

Reading: megatron-core's own ``dist_checkpointing.load``, asked for one layer's slice at a time.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex, TensorProperties,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, TensorWriteData, WriteItem, WriteItemType

from . import require_megatron_core
from .dims import ConversionError, ModelDims
from .mapping import EXPERT, GLOBAL, Rule, instances

BACKEND_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                    "common_backend": "torch", "common_backend_version": 1}


def _offsets(dims: ModelDims, rule: Rule, layer, expert) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(leading global shape, this instance's offsets in it): [L] / [L, E] / nothing."""
    if rule.scope == GLOBAL:
        return (), ()
    if rule.scope == EXPERT:
        return (dims.num_layers, dims.num_experts), (layer, expert)
    return (dims.num_layers,), (layer,)


def extra_state_key(dims: ModelDims, rule: Rule, layer, expert) -> str:
    """The DCP key of a linear layer's ``_extra_state`` object: ``ShardedObject.unique_key``."""
    lead, at = _offsets(dims, rule, layer, expert)
    base = rule.key.rsplit(".", 1)[0] + "._extra_state"
    return f"{base}/shard_{'.'.join(map(str, at))}_{'.'.join(map(str, lead))}"


class _StreamingPlanner(SavePlanner):
    """A DCP save planner whose tensors are produced on demand, from a list of chunks known by shape."""

    def __init__(self, chunks: list[tuple[str, tuple, tuple, tuple, torch.dtype, Callable]], objects: dict):
        self.chunks = {(fqn, tuple(off)): (size, make) for fqn, _, off, size, _, make in chunks}
        self.items = [WriteItem(index=MetadataIndex(fqn, torch.Size(off)), type=WriteItemType.SHARD,
                                tensor_data=TensorWriteData(
                                    chunk=ChunkStorageMetadata(offsets=torch.Size(off), sizes=torch.Size(size)),
                                    properties=TensorProperties(dtype=dtype), size=torch.Size(shape)))
                      for fqn, shape, off, size, dtype, _ in chunks]
        self.items += [WriteItem(index=MetadataIndex(k), type=WriteItemType.BYTE_IO) for k in objects]
        self.objects = objects
        self.dtypes = {fqn: dtype for fqn, _, _, _, dtype, _ in chunks}

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        pass

    def create_local_plan(self) -> SavePlan:
        return SavePlan(self.items)

    def create_global_plan(self, all_plans):
        plans, self.metadata = create_default_global_save_plan(all_plans)
        return plans, self.metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def resolve_data(self, write_item: WriteItem):
        fqn = write_item.index.fqn
        if write_item.type == WriteItemType.BYTE_IO:
            return self.objects[fqn]
        size, make = self.chunks[(fqn, tuple(write_item.index.offset))]
        tensor = make()
        if tuple(tensor.shape) != tuple(size):
            raise ConversionError(f"{fqn} at {tuple(write_item.index.offset)}: made {tuple(tensor.shape)}, "
                                  f"planned {tuple(size)}")
        return tensor.to(self.dtypes[fqn]).contiguous()


def save_streaming(out_dir: str | Path, dims: ModelDims, rule_list: Iterable[Rule], dtype: torch.dtype,
                   get_whole: Callable[[Rule, int | None, int | None], torch.Tensor],
                   common: dict | None = None) -> Path:
    """Write a dist_checkpointing checkpoint of every rule's tensors; ``get_whole(rule, layer,
    expert)`` is called once per tensor, during writing, in checkpoint order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise ConversionError(f"{out}: not empty; the checkpoint needs an empty directory")
    chunks, objects = [], {}
    for rule in rule_list:
        for layer, expert in instances(dims, rule):
            lead, at = _offsets(dims, rule, layer, expert)
            shape = (*lead, *rule.shape)
            size = (1,) * len(lead) + rule.shape
            off = (*at, *(0,) * len(rule.shape))

            def make(rule=rule, layer=layer, expert=expert, size=size):
                return get_whole(rule, layer, expert).reshape(size)  # the leading singleton axes

            chunks.append((rule.key, shape, off, size, dtype, make))
            if rule.extra_state:
                buf = io.BytesIO()
                torch.save([None], buf)  # what megatron saves for a local (non-TE) linear's extra state
                buf.seek(0)
                objects[extra_state_key(dims, rule, layer, expert)] = buf
    # thread_count=1 and one file: DCP's serial loader resolves the chunks one by one.
    writer = FileSystemWriter(str(out), single_file_per_rank=True, thread_count=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, on purpose
        dcp_save({}, storage_writer=writer, planner=_StreamingPlanner(chunks, objects), no_dist=True)
    torch.save(common or {}, out / "common.pt")
    (out / "metadata.json").write_text(json.dumps(BACKEND_METADATA))
    return out


def tensor_shapes(ckpt_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """{key: global shape} of every tensor of a dist checkpoint (reads only the metadata)."""
    meta = FileSystemReader(str(ckpt_dir)).read_metadata()
    return {k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


@contextlib.contextmanager
def process_group():
    """A one-process gloo group when none exists (megatron's loader gathers metadata across
    ranks); an existing group is used as it is."""
    if dist.is_initialized():
        yield
        return
    hook = sys.excepthook  # init_process_group wraps it to prefix "[rank0]:"; undone below
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        sys.excepthook = hook


class StreamingReader:
    """Reads whole per-layer (per-expert) tensors of a dist checkpoint with megatron's loader."""

    def __init__(self, ckpt_dir: str | Path, dims: ModelDims):
        require_megatron_core()
        self.dir, self.dims = Path(ckpt_dir), dims
        if not (self.dir / "metadata.json").is_file():
            raise ConversionError(f"{self.dir}: not a megatron dist_checkpointing directory (no metadata.json)")
        tensors = {k: v for k, v in FileSystemReader(str(self.dir)).read_metadata().state_dict_metadata.items()
                   if isinstance(v, TensorStorageMetadata)}
        self.shapes = {k: tuple(v.size) for k, v in tensors.items()}
        self.dtypes = {k: v.properties.dtype for k, v in tensors.items()}

    def read(self, requests: list[tuple[Rule, int | None, int | None]]) -> list[torch.Tensor]:
        """The whole tensors of ``(rule, layer, expert)`` requests, in one megatron load."""
        from megatron.core import dist_checkpointing
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        sharded = {}
        for i, (rule, layer, expert) in enumerate(requests):
            lead, at = _offsets(self.dims, rule, layer, expert)
            expected = (*lead, *rule.shape)
            if rule.key not in self.shapes:
                raise ConversionError(f"{self.dir}: tensor {rule.key} is missing from the checkpoint")
            if self.shapes[rule.key] != expected:
                raise ConversionError(f"{self.dir}: {rule.key} has shape {self.shapes[rule.key]}, the config "
                                      f"implies {expected}")
            # The layer/expert axes as ordinary axes of a [1, (1,) ...] slice rather than megatron's
            # "prepended" axes: on one process megatron would take every other layer's grid cell
            # of a prepended-axis tensor for a local shard of its own.
            data = torch.empty((1,) * len(lead) + rule.shape, dtype=self.dtypes[rule.key])
            offsets = [(axis, index, total) for axis, (index, total) in enumerate(zip(at, lead))]
            sharded[str(i)] = ShardedTensor.from_rank_offsets(rule.key, data, *offsets, replica_id=0)
        with process_group(), warnings.catch_warnings():  # a no-op inside the caller's own group
            # megatron-core's own call of DCP's renamed load_state_dict; not ours to fix.
            warnings.filterwarnings("ignore", message="`load_state_dict` is deprecated", category=FutureWarning)
            # Only this slice is asked for, so the "every shard read exactly once" check would fail.
            loaded = dist_checkpointing.load(sharded, str(self.dir), validate_access_integrity=False)
        return [loaded[str(i)].reshape(rule.shape) for i, (rule, _, _) in enumerate(requests)]
