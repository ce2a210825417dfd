import os

import pytest
import torch

# No test leaves a process behind: the session fails naming any still running at its end.
from proc_guard import pytest_configure, pytest_sessionfinish, pytest_terminal_summary  # noqa: F401

# Keep CPU tests deterministic and within the 2-core budget.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
