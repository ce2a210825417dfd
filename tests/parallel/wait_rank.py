"""Run by ``torchrun --nproc_per_node=N`` from test_dist.py (not a test module itself): each rank
joins the process group the way every stage does, writes ``<out>/rank<R>.pid`` and then waits,
like a rank stuck at a fault point, until something kills it. argv: the output directory."""

import os
import sys
import time
from pathlib import Path

from moslim_mega.parallel import dist

if __name__ == "__main__":
    dist.init_distributed()  # False for a world of one: that rank must die with its agent too
    out = Path(sys.argv[1])
    tmp = out / f"rank{dist.rank()}.pid.tmp"
    tmp.write_text(str(os.getpid()))
    tmp.rename(out / f"rank{dist.rank()}.pid")  # whole file or none: the test reads it at once
    while True:
        time.sleep(0.05)
