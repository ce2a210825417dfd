"""Run by ``torchrun --nproc_per_node=2`` from test_trainers_gloo.py (not a test module): ``moslim``
CLI jobs (``moslim_mega.cli.main``, the real entry point) with the megatron backend on CPU — inside
the test-only CPU shim (cpu_shim.py), which no product code imports. argv: a JSON file with a list
of jobs, run one after another in one launch: an argument list (must succeed), or
``{"argv": [...], "rc": N}`` for a job that must end with status N (a refusal)."""

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/ on the path: engine.megatron.cpu_shim


def main(jobs_file: str) -> None:
    from megatron.core import parallel_state as ps

    from engine.megatron.cpu_shim import cpu_megatron
    from moslim_mega.cli import main as cli
    from moslim_mega.parallel.dist import exit_process

    with cpu_megatron():
        for job in json.loads(Path(jobs_file).read_text()):
            argv, expected = (job["argv"], job["rc"]) if isinstance(job, dict) else (job, 0)
            rc = cli(argv)
            if rc != expected:
                raise SystemExit(f"moslim {' '.join(argv)} returned {rc}, expected {expected}")
            # megatron's tensor/pipeline groups are process-global; the next job may use another layout.
            ps.destroy_model_parallel()
    exit_process(0)  # as the CLI does: skip the interpreter teardown where gloo can abort a finished rank


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
