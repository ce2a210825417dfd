"""The one trainer loop: resume, progress, metrics, profiling marks, checkpoints and the time limit.

SFT, the RM trainer, the regression RM baseline and the policy controller differ only in what one
step does; each hands :meth:`TrainLoop.run` its step body and the loop does the rest, in this order
every step::

    prof.step → row = body(step) → (every log_every steps) write row, progress postfix
    → after(step) (evaluation, saves) → checkpoint.after_step → prof "checkpoint" → time limit

Resume: ``StageCheckpoints.restore()`` (model and optimizer weights) and then ``load_state`` with
the checkpoint's loop state; the run continues at ``steps_done``. The time limit (``max_minutes``,
a safety net, not the plan) is decided on rank 0's clock and broadcast, so every rank stops after
the same step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from ..config import ProfileConfig
from ..profile import Profiler
from ..utils.progress import progress


@dataclass(frozen=True)
class LoopConfig:
    """What the loop needs to know of its stage's config."""

    desc: str
    """Progress-bar and message prefix (``sft``, ``rm train``, ``policy rloo``)."""
    total_steps: int
    """Planned optimizer steps."""
    max_minutes: float = 0.0
    """Stop after the first step past this many minutes of training (0 = no limit)."""
    max_minutes_key: str = ""
    """The config key of ``max_minutes``, named in the stop message (``sft.max_minutes``)."""
    log_every: int = 10
    """Write the body's row to the metrics every this many steps (and at step 0)."""
    show_progress: bool = True
    """Show the progress bar (on the main rank)."""


class TrainLoop:
    """One stage's loop. ``stage`` (parallel.stage.Stage) may be None for a single-process trainer;
    ``writer`` None writes no metrics; ``ckpt`` (checkpoint.hooks.StageCheckpoints) None neither
    checkpoints nor resumes; ``prof`` None profiles nothing."""

    def __init__(self, lc: LoopConfig, stage=None, writer=None, ckpt=None, prof: Profiler | None = None):
        self.lc, self.stage, self.writer, self.ckpt = lc, stage, writer, ckpt
        self.prof = prof or Profiler(ProfileConfig(enabled=False), lc.desc)
        self.start = time.time()

    @property
    def is_main(self) -> bool:
        return self.stage is None or self.stage.is_main

    def resume(self, load_state: Callable[[dict], None]) -> int:
        """Restore the latest checkpoint (if any and enabled) → the first step to run."""
        if self.ckpt is None or (state := self.ckpt.restore()) is None:
            return 0
        load_state(state)
        return state["steps_done"]

    def run(self, first: int, body: Callable[[int], dict], save_state: Callable[[], dict] = dict,
            after: Callable[[int], None] | None = None, postfix: Callable[[dict], dict] | None = None) -> dict:
        """Steps ``first .. total_steps − 1``; → steps, planned_steps, stopped_by_max_minutes, train_seconds.

        ``body(step) -> row`` does one step (its own profiler marks included) and returns its
        metrics row; ``postfix(row)`` the progress bar's fields; ``after(step)`` runs after the
        row is written (evaluation, saves); ``save_state()`` is the loop state a checkpoint keeps
        besides models, optimizers and global RNGs."""
        lc = self.lc
        bar = progress(range(first, lc.total_steps), lc.desc, lc.show_progress and self.is_main)
        step, stopped = first - 1, False
        self.prof.mark("setup")
        for step in bar:
            self.prof.step(step)
            row = body(step)
            if step % lc.log_every == 0:
                if self.writer is not None:
                    self.writer.write(step, row)
                if postfix is not None:
                    bar.set_postfix(**postfix(row))
            if after is not None:
                after(step)
            if self.ckpt is not None:
                self.ckpt.after_step(step + 1, save_state)
            self.prof.mark("checkpoint")
            if step + 1 < lc.total_steps and self._out_of_time():
                bar.write(f"{lc.desc}: stopping at step {step} of {lc.total_steps} "
                          f"({lc.max_minutes_key}={lc.max_minutes} was hit: a safety net, not the plan — "
                          "the run is shorter than configured)")
                stopped = True
                break
        bar.close()
        return {"steps": step + 1, "planned_steps": lc.total_steps, "stopped_by_max_minutes": stopped,
                "train_seconds": time.time() - self.start}

    def _out_of_time(self) -> bool:
        if not self.lc.max_minutes:
            return False
        late = time.time() - self.start > self.lc.max_minutes * 60
        # Rank 0's clock decides for all: ranks that disagreed would wait in different collectives.
        return late if self.stage is None else bool(self.stage.broadcast(late))


def loop_config(desc: str, total_steps: int, stage_cfg, key: str, show_progress: bool,
                log_every: int = 10) -> LoopConfig:
    """A LoopConfig from a stage config with a ``max_minutes`` field named ``key``.max_minutes."""
    return LoopConfig(desc, total_steps, stage_cfg.max_minutes, f"{key}.max_minutes", log_every, show_progress)

