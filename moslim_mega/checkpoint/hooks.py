"""The two calls a training loop makes: ``restore()`` before its first step and ``after_step()``
after each one. Shared by SFT, the RM trainer and the policy controller."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import faults, preempt
from ..parallel.dist import rank
from .manager import CheckpointManager, _barrier


class StageCheckpoints:
    """Checkpoints of one stage: ``models`` {name: module}, ``optimizers`` {name: (module,
    optimizer)}, the stage's MetricsWriter (its file is cut back to the checkpoint on resume) and
    an ``assets(dir)`` writer for export files."""

    def __init__(self, cfg, stage_out: str | Path, models: dict, optimizers: dict, writer,
                 assets: Callable[[Path], None] | None = None, log: Callable[[str], None] = print):
        self.manager = CheckpointManager(cfg, stage_out)
        self.models, self.optimizers, self.writer, self.assets, self.log = models, optimizers, writer, assets, log
        preempt.install()  # USR1/TERM → checkpoint and exit, in a `moslim launch` job only

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
        faults.maybe_wait_for_signal(steps_done, preempt.received)
        signum = preempt.agreed_signal() if preempt.marker_path() is not None else 0
        path = None
        if self.manager.due(steps_done) or signum:
            extra = {**loop_state(), "steps_done": steps_done, "metrics_offset": self.writer.offset()}
            path = self.manager.save(steps_done, self.models, self.optimizers, extra, self.assets)
        faults.maybe_wait_for_kill("after_step", steps_done)
        if signum:
            # Every rank saw the same flag (all-reduced), so all stop here after the same save.
            if rank() == 0:
                preempt.write_marker(steps_done, signum, path)
            _barrier()
            self.log(f"preempted: checkpoint {path} written after step {steps_done}; exiting with "
                     f"status {preempt.PREEMPTED_EXIT}")
            raise preempt.Preempted(steps_done, signum)
