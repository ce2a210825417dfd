"""Process-group set-up from the ``torchrun`` environment and rank helpers.

gloo on CPU, NCCL on CUDA. A process started without ``torchrun`` (no WORLD_SIZE) is a world of
one and never initialises a process group, so single-process runs stay exactly as before.

A rank dies with its launcher: torchrun starts every worker in a session of its own, so a SIGKILL
of the agent (or of its process group) alone would leave the ranks running, holding their GPUs.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when absent)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(timeout_s: float = 600.0) -> bool:
    """Initialise the default process group from torchrun's env; True when distributed."""
    if dist.is_initialized():
        return True
    if env_world_size() > 1 or LAUNCHER_ENV in os.environ:  # a rank, even torchrun's only one
        die_with_parent()
    if env_world_size() <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    # Tear the group down before the interpreter does: gloo's threads outliving it abort the
    # process ("terminate called without an active exception") after a run that succeeded.
    atexit.register(destroy)
    return True


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LAUNCHER_ENV = "TORCHELASTIC_RUN_ID"  # set by torchrun for its workers
_armed = False


def die_with_parent(poll_s: float = 1.0) -> None:
    """End this process as soon as its parent (the torchrun agent) dies.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, delivered by the kernel when the thread that
    spawned us exits; torchrun's agent spawns its workers from its main thread, so that is the
    agent process's death. Elsewhere a daemon thread polls the parent pid. Called first thing in
    ``init_distributed``; a rank whose agent dies before that (interpreter start-up) is not caught
    here, and fails only at the rendezvous (the agent hosted the store), after its timeout.
    """
    global _armed
    if _armed:  # once per process (several stages may run in one)
        return
    _armed = True
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        _set_parent_death_signal(signal.SIGKILL)
    else:
        _watch_parent(parent, poll_s)
    if os.getppid() != parent:  # the agent died before the signal was armed: it will never come
        _exit_orphaned(parent)


def _set_parent_death_signal(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")


def _exit_orphaned(parent: int) -> None:
    """Exit at once (no atexit, no collective that would wait for the other ranks)."""
    print(f"moslim: parent process {parent} (the launcher) is gone; rank {os.getpid()} exits",
          file=sys.stderr, flush=True)
    os._exit(1)


def _watch_parent(parent: int, poll_s: float) -> threading.Thread:
    """A daemon thread that ends this process once its parent pid is no longer ``parent``
    (the parent died and we were re-parented)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        _exit_orphaned(parent)

    thread = threading.Thread(target=watch, name="moslim-parent-watch", daemon=True)
    thread.start()
    return thread


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank — the one place the package reads it: the process group's once
    one is initialised, else torchrun's ``RANK`` (before init or after destroy; 0 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """Processes in the default group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 writes files, logs and progress bars."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj, src: int = 0, group=None):
    """``obj`` from global rank ``src`` on every rank of ``group`` (identity when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(rc: int) -> None:
    """End a CLI process with status ``rc``. A rank whose run succeeded waits for the others at a
    barrier, tears the process group down and leaves with ``os._exit``, skipping the interpreter's
    teardown: there gloo's threads, outliving the group, now and then abort a rank that has already
    saved everything ("terminate called without an active exception", exit -6), and torchrun then
    reports the whole job failed. Failing runs exit as before (a barrier could wait on a rank that
    died), and so does a plain single-process run."""
    if rc != 0 or not is_distributed():
        sys.exit(rc)
    dist.barrier()
    destroy()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

