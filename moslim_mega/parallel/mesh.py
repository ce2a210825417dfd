"""The DeviceMesh of a run: ``parallel.dp`` × ``parallel.tp`` (room for ``pp`` and ``cp``).

Mesh dimension names are fixed: ``dp`` (FSDP2 shards parameters, gradients and optimizer state
over it; each dp rank reads its own slice of the data) and ``tp`` (DTensor tensor parallel; the
ranks of one tp group see identical data). TP is the inner dimension, so a tp group lies on one
node when tp ≤ GPUs per node.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..config import ConfigError
from . import dist as pdist


@dataclass(frozen=True)
class MeshShape:
    dp: int
    tp: int

    @property
    def world(self) -> int:
        return self.dp * self.tp


def resolve_shape(pc, world_size: int) -> MeshShape:
    """Check ``parallel.*`` against the world size; ``parallel.dp=0`` takes the remaining ranks."""
    for name in ("pp", "cp"):
        if getattr(pc, name) != 1:
            raise ConfigError(
                f"parallel.{name}={getattr(pc, name)}: pipeline/context parallel are not implemented in the "
                "torch backend yet (use 1; the megatron backend is the route to pipeline parallel)"
            )
    if pc.tp < 1:
        raise ConfigError(f"parallel.tp={pc.tp}: must be >= 1")
    if pc.dp < 0:
        raise ConfigError(f"parallel.dp={pc.dp}: must be >= 0 (0 = world size / tp)")
    if world_size % pc.tp:
        raise ConfigError(f"parallel.tp={pc.tp} does not divide the world size {world_size}")
    dp = pc.dp or world_size // pc.tp
    if dp * pc.tp != world_size:
        raise ConfigError(f"parallel.dp={pc.dp} × parallel.tp={pc.tp} = {dp * pc.tp} ≠ world size {world_size}")
    return MeshShape(dp, pc.tp)


def build_mesh(pc, world_size: int | None = None, device_type: str | None = None) -> DeviceMesh | None:
    """A 2-D ("dp", "tp") DeviceMesh, or None for a single process (nothing to parallelise)."""
    world_size = pdist.world_size() if world_size is None else world_size
    shape = resolve_shape(pc, world_size)
    if world_size == 1:
        return None
    return init_device_mesh(device_type or pdist.device_type(), (shape.dp, shape.tp), mesh_dim_names=("dp", "tp"))


def dp_rank_size(mesh: DeviceMesh | None) -> tuple[int, int]:
    """(this rank's dp index, dp size): which data shard to read."""
    if mesh is None:
        return 0, 1
    return mesh["dp"].get_local_rank(), mesh["dp"].size()


def tp_size(mesh: DeviceMesh | None) -> int:
    return 1 if mesh is None else mesh["tp"].size()
