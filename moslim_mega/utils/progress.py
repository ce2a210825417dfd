"""Training progress fit for batch jobs.

On a terminal the trainers show a redrawing tqdm bar. Under sbatch, a pipe or a log file a
redrawing bar writes carriage-return frames into the log, so there a plain line is printed instead,
every ``MOSLIM_LOG_EVERY_S`` seconds (default 30) and at the last step:

    sft: step 120/378 (31.7%) 1.9 it/s elapsed 0:01:03 eta 0:02:15 loss=1.848
"""

from __future__ import annotations

import datetime
import os
import sys
import time

from tqdm import tqdm

ENV_EVERY_S = "MOSLIM_LOG_EVERY_S"
DEFAULT_EVERY_S = 30.0


def log_every_seconds() -> float:
    raw = os.environ.get(ENV_EVERY_S)
    if raw is None:
        return DEFAULT_EVERY_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_EVERY_S}={raw!r}: expected a number of seconds") from None
    if not value >= 0:
        raise ValueError(f"{ENV_EVERY_S}={raw!r}: must be >= 0")
    return value


def progress(steps: range, desc: str, enabled: bool, stream=None):
    """An iterable over ``steps`` with ``set_postfix``, ``write`` and ``close``: a tqdm bar on a
    terminal, plain periodic lines elsewhere, silent (but ``write`` still prints) when disabled."""
    stream = sys.stderr if stream is None else stream
    if enabled and _is_terminal(stream):
        return tqdm(steps, desc=desc, file=stream, dynamic_ncols=True)
    return PlainProgress(steps, desc, enabled, stream, log_every_seconds())


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class PlainProgress:
    def __init__(self, steps: range, desc: str, enabled: bool, stream, every_s: float):
        self.steps, self.desc, self.enabled, self.stream, self.every_s = steps, desc, enabled, stream, every_s
        self.postfix: dict[str, str] = {}
        self._start = self._last = time.monotonic()

    def __iter__(self):
        last = self.steps[-1] if len(self.steps) else None
        for done, step in enumerate(self.steps, 1):
            yield step
            now = time.monotonic()
            if self.enabled and (now - self._last >= self.every_s or step == last):
                self._last = now
                self.write(self.line(step + 1, done, now - self._start))

    def line(self, position: int, done: int, elapsed: float) -> str:
        total = self.steps.stop
        rate = done / elapsed if elapsed > 0 else float("inf")
        eta = (total - position) / rate if rate > 0 and rate != float("inf") else 0.0
        post = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return (f"{self.desc}: step {position}/{total} ({100.0 * position / max(total, 1):.1f}%) "
                f"{rate:.2f} it/s elapsed {_hms(elapsed)} eta {_hms(eta)}" + (f" {post}" if post else ""))

    def set_postfix(self, **kwargs) -> None:
        self.postfix = {k: str(v) for k, v in kwargs.items()}

    def write(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def close(self) -> None:
        return None


def _hms(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))
