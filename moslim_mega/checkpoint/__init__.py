"""Exact-resume sharded training checkpoints (torch.distributed.checkpoint) and HF export."""

from .hooks import StageCheckpoints
from .manager import CheckpointError, CheckpointManager, resolve_checkpoint

__all__ = ["CheckpointError", "CheckpointManager", "StageCheckpoints", "resolve_checkpoint"]
