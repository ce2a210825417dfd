"""A tiny world, SFT model and RM built once for the checkpoint tests, and helpers to run the real
CLI in a subprocess and kill it (SIGKILL) at a fault-injection point."""

import pytest
import torch

from ckpt_helpers import SMALL
from tiny_stage import build_tiny_stage


@pytest.fixture(scope="session")
def stage(tmp_path_factory):
    """World (64 SFT pairs, 16×4 RM pairs) → an 8-step SFT → an 8-step RM."""
    threads = torch.get_num_threads()
    root = tmp_path_factory.mktemp("ckpt_stage")
    built = build_tiny_stage(root, SMALL)
    torch.set_num_threads(threads)
    paths = built["paths"]
    overrides = built["overrides"] + [f"policy.init={built['sft_dir']}", f"policy.rm_dir={built['rm_dir']}",
                                      f"policy.prompts={paths['policy_train']}"]
    return {"overrides": overrides, "sft_data": paths["sft"], "root": root}
