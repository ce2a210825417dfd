import os

import pytest
import torch

# No test leaves a process behind: the session fails naming any still running at its end.
try:
    from proc_guard import pytest_configure, pytest_sessionfinish, pytest_terminal_summary  # noqa: F401
except ModuleNotFoundError as e:  # psutil is a dev dependency (`make test` installs it); a bare GPU machine may lack it
    if e.name != "psutil":
        raise

    def pytest_terminal_summary(terminalreporter):
        terminalreporter.write_line("leftover-process check OFF: psutil is not installed (pip install psutil)",
                                    yellow=True, bold=True)

# Keep CPU tests deterministic and within the 2-core budget.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
