"""Run by ``torchrun --nproc_per_node=2`` from test_torchrun_stages.py (not a test module itself):
each stage through the real ``moslim`` CLI entry point, one after another in one launch (one
process-group start-up instead of six). argv: a JSON file with a list of argument lists."""

import json
import sys

from moslim_mega.cli import main

if __name__ == "__main__":
    from moslim_mega.parallel.dist import exit_process

    for argv in json.loads(open(sys.argv[1]).read()):
        rc = main(argv)
        if rc != 0:
            raise SystemExit(f"moslim {' '.join(argv)} returned {rc}")
    exit_process(0)  # as the CLI does: skip the interpreter teardown where gloo can abort a finished rank
