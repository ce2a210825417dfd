"""The two calls a training loop makes: ``restore()`` before its first step and ``after_step()``
after each one. Shared by SFT, the RM trainer and the policy controller."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import faults
from .manager import CheckpointManager


class StageCheckpoints:
    """Checkpoints of one stage: ``models`` {name: module}, ``optimizers`` {name: (module,
    optimizer)}, the stage's MetricsWriter (its file is cut back to the checkpoint on resume) and
    an ``assets(dir)`` writer for export files."""

    def __init__(self, cfg, stage_out: str | Path, models: dict, optimizers: dict, writer,
                 assets: Callable[[Path], None] | None = None, log: Callable[[str], None] = print):
        self.manager = CheckpointManager(cfg, stage_out)
        self.models, self.optimizers, self.writer, self.assets, self.log = models, optimizers, writer, assets, log

    def restore(self) -> dict | None:
        """Load the checkpoint chosen by ``checkpoint.resume``; its loop state, or None (fresh start)."""
        path = self.manager.resume_path()
        if path is None:
            return None
        state = self.manager.load(path, self.models, self.optimizers)
        offset = state.pop("metrics_offset")
        if path.parent.resolve() == self.manager.root.resolve():
            # Same run: rows logged after the checkpoint belong to the lost timeline and the
            # resumed run writes them again. (From another run's checkpoint: append.)
            if not self.writer.truncate(offset):
                self.log(f"{self.writer.path} is shorter than at {path.name}: left as is")
        self.log(f"resumed from {path} ({state['steps_done']} steps done)")
        return state

    def after_step(self, steps_done: int, loop_state: Callable[[], dict]) -> None:
        """Save if ``steps_done`` is a multiple of ``checkpoint.every``. ``loop_state()`` must
        return every stateful thing of the loop besides models/optimizers/global RNGs."""
        if self.manager.due(steps_done):
            extra = {**loop_state(), "steps_done": steps_done, "metrics_offset": self.writer.offset()}
            self.manager.save(steps_done, self.models, self.optimizers, extra, self.assets)
        faults.maybe_wait_for_kill("after_step", steps_done)
