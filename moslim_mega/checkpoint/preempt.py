"""Preemption and time limits: USR1/TERM → finish the step → checkpoint → exit 75 + a marker file.

Armed only in a launched job: the sbatch script of ``moslim launch slurm`` sets
``MOSLIM_PREEMPT_MARKER`` (the marker path) for every rank, and ``StageCheckpoints`` then installs
handlers for SIGUSR1 (Slurm's ``--signal=B:USR1@N`` warning, forwarded by the node wrapper) and
SIGTERM (scancel, node shutdown). A handler only sets a flag: the loop checks it at the end of each
step, and all ranks agree on it (all-reduce of the max) so they stop after the same step, write
the same checkpoint and exit together with status ``PREEMPTED_EXIT``. torchrun collapses worker
exit codes, so rank 0 also writes the marker file, which the batch script reads to decide on
``scontrol requeue``. The requeued run resumes with ``checkpoint.resume=auto``.

Outside a launched job (no marker variable) nothing is installed and SIGTERM keeps its default.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

MARKER_ENV = "MOSLIM_PREEMPT_MARKER"
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: list[int] = []
_installed = False


class Preempted(SystemExit):
    """Raised after the preemption checkpoint; its exit status is ``PREEMPTED_EXIT``."""

    def __init__(self, step: int, signum: int):
        super().__init__(PREEMPTED_EXIT)
        self.step, self.signum = step, signum


def marker_path() -> Path | None:
    value = os.environ.get(MARKER_ENV, "")
    return Path(value) if value else None


def _handler(signum, _frame) -> None:
    # Idempotent: the wrapper and Slurm may each deliver the same signal; one flag is enough.
    if not _received:
        print(f"moslim: {signal.Signals(signum).name} received; checkpointing at the end of this step",
              file=sys.stderr, flush=True)
    _received.append(signum)


def install() -> bool:
    """Install the handlers if this process is part of a launched job (main thread only)."""
    global _installed
    if _installed:
        return True
    if marker_path() is None or threading.current_thread() is not threading.main_thread():
        return False
    for sig in SIGNALS:
        signal.signal(sig, _handler)
    _installed = True
    return True


def received() -> bool:
    """This rank has received a preemption signal (not yet agreed with the others)."""
    return bool(_received)


def agreed_signal() -> int:
    """The signal any rank received (0: none). Collective under torch.distributed: every rank
    calls it after every step, so all stop after the same one."""
    local = _received[0] if _received else 0
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([local], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def write_marker(step: int, signum: int, checkpoint: Path) -> None:
    """Rank 0: tell the batch script this run stopped for a preemption (not a failure)."""
    path = marker_path()
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"signal={signal.Signals(signum).name} step={step} checkpoint={checkpoint}\n")
    os.replace(tmp, path)


def reset() -> None:
    """Forget a received signal (tests running several stages in one process)."""
    _received.clear()
