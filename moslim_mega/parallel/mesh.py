"""The DeviceMesh of a run: ``parallel.pp`` × ``parallel.dp`` × ``parallel.tp`` (room for ``cp``).

Mesh dimension names are fixed: ``pp`` (pipeline stages: each pp rank holds a range of decoder
layers, :mod:`.pipeline`), ``dp`` (FSDP2 shards parameters, gradients and optimizer state over it;
each dp rank reads its own slice of the data) and ``tp`` (DTensor tensor parallel; the ranks of one
tp group see identical data). TP is the innermost dimension, so a tp group lies on one node when
tp ≤ GPUs per node; pp is the outermost, so only the stage-boundary activations cross the slowest
links (torchtitan's order). With pp = 1 the mesh still has a size-1 ``pp`` dimension, so
``mesh["dp"]`` / ``mesh["tp"]`` mean the same on every layout.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ConfigError
from . import dist as pdist

DIM_NAMES = ("pp", "dp", "tp")


@dataclass(frozen=True)
class MeshShape:
    dp: int
    tp: int
    pp: int = 1

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.tp


def _check_pipeline(pc) -> None:
    """The pipeline fields agree with each other (they only matter under pp > 1)."""
    v = pc.pp_stages_per_rank
    if pc.pp_schedule == "interleaved_1f1b" and pc.pp > 1 and v < 2:
        raise ConfigError(f"parallel.pp_schedule=interleaved_1f1b needs parallel.pp_stages_per_rank >= 2, got {v} "
                          "(with one stage per rank use 1f1b)")
    if pc.pp_schedule != "interleaved_1f1b" and v != 1:
        raise ConfigError(f"parallel.pp_stages_per_rank={v}: only interleaved_1f1b runs several stages per rank "
                          f"(parallel.pp_schedule={pc.pp_schedule})")


def resolve_shape(pc, world_size: int) -> MeshShape:
    """Check ``parallel.*`` against the world size; ``parallel.dp=0`` takes the remaining ranks."""
    if pc.cp != 1:
        raise ConfigError(f"parallel.cp={pc.cp}: context parallel is not implemented in the torch backend yet (use 1)")
    if pc.pp < 1:
        raise ConfigError(f"parallel.pp={pc.pp}: must be >= 1")
    if pc.tp < 1:
        raise ConfigError(f"parallel.tp={pc.tp}: must be >= 1")
    if pc.dp < 0:
        raise ConfigError(f"parallel.dp={pc.dp}: must be >= 0 (0 = world size / (pp × tp))")
    _check_pipeline(pc)
    if world_size % (pc.pp * pc.tp):
        what = f"parallel.tp={pc.tp}" if pc.pp == 1 else f"parallel.pp={pc.pp} × parallel.tp={pc.tp}"
        raise ConfigError(f"{what} does not divide the world size {world_size}")
    dp = pc.dp or world_size // (pc.pp * pc.tp)
    if pc.pp * dp * pc.tp != world_size:
        pp = "" if pc.pp == 1 else f"parallel.pp={pc.pp} × "
        raise ConfigError(f"{pp}parallel.dp={pc.dp} × parallel.tp={pc.tp} = {pc.pp * dp * pc.tp} ≠ world size {world_size}")
    return MeshShape(dp, pc.tp, pc.pp)


def build_mesh(pc, world_size: int | None = None, device_type: str | None = None) -> DeviceMesh | None:
    """A 3-D ("pp", "dp", "tp") DeviceMesh, or None for a single process (nothing to parallelise)."""
    world_size = pdist.world_size() if world_size is None else world_size
    shape = resolve_shape(pc, world_size)
    if world_size == 1:
        return None
    return init_device_mesh(device_type or pdist.device_type(), (shape.pp, shape.dp, shape.tp),
                            mesh_dim_names=DIM_NAMES)


def dp_rank_size(mesh: DeviceMesh | None) -> tuple[int, int]:
    """(this rank's dp index, dp size): which data shard to read (all pp stages of one dp index read
    the same shard)."""
    if mesh is None:
        return 0, 1
    return mesh["dp"].get_local_rank(), mesh["dp"].size()


def tp_size(mesh: DeviceMesh | None) -> int:
    return 1 if mesh is None else mesh["tp"].size()


def pp_rank_size(mesh: DeviceMesh | None) -> tuple[int, int]:
    """(this rank's pipeline stage-rank, pp size)."""
    if mesh is None or "pp" not in (mesh.mesh_dim_names or ()):
        return 0, 1
    return mesh["pp"].get_local_rank(), mesh["pp"].size()
