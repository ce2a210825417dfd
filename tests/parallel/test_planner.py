"""``moslim plan``: the real Qwen2 shapes built on the meta device under a fake process group."""

import json
import os
import subprocess
import sys

import pytest
import torch

from moslim_mega.config import ConfigError
from moslim_mega.parallel.planner import GIB, plan
from moslim_mega.parallel.presets import PRESETS

from .test_equivalence import REPO


def dense_params(V, H, I, L, heads, kv_heads):
    """Qwen2 by hand: untied embedding + LM head, q/k/v with bias, o without, SwiGLU MLP, 2 norms
    per layer and a final norm."""
    kv = kv_heads * (H // heads)
    layer = (H * H + H) + 2 * (H * kv + kv) + H * H + 3 * H * I + 2 * H
    return 2 * V * H + L * layer + H


def moe_params(V, H, L, heads, kv_heads, E, moe_I, shared_I):
    kv = kv_heads * (H // heads)
    attn = (H * H + H) + 2 * (H * kv + kv) + H * H
    moe = E * 3 * H * moe_I + E * H + 3 * H * shared_I + H  # experts, router, shared expert, its gate
    return 2 * V * H + L * (attn + moe + 2 * H) + H


@pytest.mark.parametrize("name,expected", [
    ("qwen2-7b", dense_params(152064, 3584, 18944, 28, 28, 4)),
    ("qwen2-72b", dense_params(152064, 8192, 29568, 80, 64, 8)),
    ("qwen2-57b-a14b", moe_params(151936, 3584, 28, 28, 4, 64, 2560, 20480)),
])
def test_preset_parameter_counts_are_exact(name, expected):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(PRESETS[name]())
    assert sum(p.numel() for p in model.parameters()) == expected
    # The published sizes: 7.62 B, 72.7 B, 57.4 B.
    assert round(expected / 1e9, 1) == {"qwen2-7b": 7.6, "qwen2-72b": 72.7, "qwen2-57b-a14b": 57.4}[name]


def test_per_rank_counts_follow_the_real_plan():
    p = plan("qwen2-7b", 1, 8, tp=4, dp=2, stage="ppo")
    policy = p.parts[0]
    norms = 28 * 2 * 3584 + 3584  # replicated over tp, sharded over dp
    assert policy["local_params"] == (policy["total_params"] - norms) // 8 + norms // 2
    assert policy["weights"] == pytest.approx(4 * policy["local_params"] / GIB)
    assert policy["optimizer"] == pytest.approx(2 * policy["weights"])
    assert [m["name"] for m in p.parts] == ["policy", "value", "reference", "rm"]
    assert p.parts[2]["grads"] == 0.0 and p.parts[2]["weights"] == pytest.approx(policy["weights"] / 2)
    assert p.fits and p.peak < p.capacity


def test_more_data_parallel_ranks_need_less_memory():
    one, four = plan("qwen2-72b", 1, 8, tp=8, dp=1), plan("qwen2-72b", 4, 8, tp=8, dp=4)
    # 72 B parameters × 16 bytes / 8 tp ranks ≈ 133 GiB of states alone: cannot fit one node.
    assert not one.fits and one.peak > 16 * 71e9 / 8 / GIB
    assert four.fits and four.peak < one.peak / 3


def test_bad_layout_is_a_clear_error():
    with pytest.raises(ConfigError, match="--dp 3"):
        plan("qwen2-7b", 1, 8, tp=2, dp=3)
    with pytest.raises(ConfigError, match="parallel.tp=8 does not divide the model.s num_attention_heads=28"):
        plan("qwen2-7b", 1, 8, tp=8, dp=1)  # 28 heads cannot split 8 ways


def test_plan_cli_json(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "moslim_mega.cli", "plan", "--model", "qwen2-7b", "--nodes", "1",
                          "--gpus-per-node", "8", "--dp", "8", "--json"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    p = json.loads(out.stdout)
    assert (p["dp"], p["tp"], p["stage"]) == (8, 1, "rm") and p["fits"]
