"""Fault-injection points for the crash tests (set through the environment; off by default).

``MOSLIM_FAULT=<point>:<step>`` makes the process stop at ``<point>`` of step ``<step>`` and
wait to be killed from outside (the tests send a real SIGKILL). While it waits it touches
``MOSLIM_FAULT_MARKER`` (a file path), so the killer knows the point has been reached:

* ``after_step:N``  — after step N's updates (and its checkpoint, if one was due);
* ``in_save:N``     — inside the checkpoint of step N, after every shard and per-rank file is
  written into ``step_N.tmp`` but before the rename and the ``latest`` pointer;
* ``preempt_wait:N`` — after step N, wait until this rank has received a preemption signal
  (USR1/TERM, see ``preempt.py``), then carry on: the preemption tests deliver the signal at a
  known step, and a rank the signal never reaches waits until the test's timeout.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "MOSLIM_FAULT"
MARKER_ENV = "MOSLIM_FAULT_MARKER"


def maybe_wait_for_kill(point: str, step: int) -> None:
    spec = os.environ.get(ENV, "")
    if not spec or spec != f"{point}:{step}":
        return
    marker = os.environ.get(MARKER_ENV)
    if marker:
        Path(marker).write_text(f"{point}:{step} pid={os.getpid()}\n")
    while True:  # wait for the SIGKILL; a timeout would turn a test bug into a silent pass
        time.sleep(0.05)


def maybe_wait_for_signal(step: int, received) -> None:
    """``preempt_wait:<step>``: touch the marker, then wait until ``received()`` is true."""
    if os.environ.get(ENV, "") != f"preempt_wait:{step}":
        return
    marker = os.environ.get(MARKER_ENV)
    if marker:
        Path(marker).write_text(f"preempt_wait:{step} pid={os.getpid()}\n")
    while not received():
        time.sleep(0.05)
