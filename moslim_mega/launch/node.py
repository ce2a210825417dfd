"""The srun task of one node: run torchrun and carry USR1/TERM to every rank.

    python -m moslim_mega.launch.node -- python -m torch.distributed.run ... -m moslim_mega.cli rm train ...

Why a wrapper: torchrun starts each worker in a session of its own and does not forward SIGUSR1
(its default action would even kill the agent, and with it — through PDEATHSIG — every rank).
So torchrun is started with USR1 ignored (the ranks install their own handler, which replaces the
inherited SIG_IGN), and a USR1 or TERM that reaches this wrapper is sent on to each of torchrun's
children (the ranks), read from /proc. The ranks then stop at the same step, checkpoint and exit
(see moslim_mega/checkpoint/preempt.py). The wrapper exits with torchrun's status.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

FORWARDED = (signal.SIGUSR1, signal.SIGTERM)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc; no psutil needed at run time)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces or parentheses, so split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            found.append(int(entry.name))
    return found


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def run(cmd: list[str]) -> int:
    proc = subprocess.Popen(cmd, preexec_fn=_ignore_usr1)

    def forward(signum, _frame) -> None:
        ranks = children(proc.pid)
        print(f"moslim launch.node: {signal.Signals(signum).name} → ranks {ranks}", file=sys.stderr, flush=True)
        for pid in ranks:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    rc = proc.wait()
    return 128 - rc if rc < 0 else rc  # killed by a signal: the shell's 128+N convention


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m moslim_mega.launch.node -- TORCHRUN COMMAND...", file=sys.stderr)
        return 2
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
