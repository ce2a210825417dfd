"""Every stage under ``torchrun --nproc_per_node=2`` (gloo) with the same config plus parallel.*
overrides equals the single-process run: SFT and RM training (dp=2 and tp=2), the PPO loop with
dp=2 (greedy rollouts, so both runs see the same responses), RLOO and Online-DPO with tp=2 (sampled
rollouts: tp ranks share one dp shard, so the sampler's seed and weights are the single process's);
RM training also on a 2-D mesh (dp=2 × tp=2, 4 processes)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from moslim_mega.config import load_config
from moslim_mega.policy.controller import train_policy
from moslim_mega.prefs import spec_from_config
from moslim_mega.reward.trainer import train_reward_model
from moslim_mega.sft import train_sft
from moslim_mega.world.build import build_world

from .test_equivalence import torchrun, REPO

pytestmark = pytest.mark.slow

TINY = ["model.hidden_size=32", "model.intermediate_size=64", "model.num_heads=4"]
SFT = [f"sft.{o}" for o in TINY] + ["sft.batch_size=16", "sft.epochs=0.25", "sft.warmup_steps=2"]
RM = [f"rm.{o}" for o in TINY] + ["rm.batch_size=16", "rm.epochs=0.1", "rm.eval_every=0", "rm.warmup_steps=2"]
POLICY = ["policy.steps=2", "policy.prompts_per_step=4", "policy.samples_per_prompt=2", "policy.mini_batch_size=8",
          "sampling.max_new_tokens=5"]
PPO_GREEDY = ["policy.algo=ppo", "sampling.temperature=0", "policy.whiten_advantages=false"]
RLOO = ["policy.algo=rloo"]
DPO = ["policy.algo=online_dpo"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    base = ["run.tensorboard=false", f"run.data_dir={tmp / 'data'}"]
    cfg0 = load_config(None, base + ["world.num_rm_prompts=40", "world.num_rm_eval_prompts=8", "world.num_sft=64",
                                      "world.num_policy_prompts=16"])
    paths = build_world(cfg0.world, spec_from_config(cfg0.prefs), tmp / "data")
    pol = base + [f"policy.init={tmp / 'sft_1' / 'model'}", f"policy.rm_dir={tmp / 'rm_1'}",
                  f"policy.prompts={paths['policy_train']}"] + POLICY
    # Single process, in this process.
    train_sft(load_config(None, base + SFT), paths["sft"], tmp / "sft_1", show_progress=False)
    train_reward_model(load_config(None, base + RM), tmp / "rm_1", show_progress=False)
    for name, extra in (("ppo", PPO_GREEDY), ("rloo", RLOO), ("dpo", DPO)):
        c = load_config(None, pol + extra)
        train_policy(c, tmp / f"{name}_1", c.policy.init, c.policy.rm_dir, c.policy.prompts, show_progress=False)
    # The same under torchrun, through the CLI.
    tp2 = ["parallel.tp=2"]
    jobs = [
        ["sft", "train", "--data", str(paths["sft"]), "--out", str(tmp / "sft_dp2"), *base, *SFT],
        ["sft", "train", "--data", str(paths["sft"]), "--out", str(tmp / "sft_tp2"), *base, *SFT, *tp2],
        ["rm", "train", "--out", str(tmp / "rm_dp2"), *base, *RM],
        ["rm", "train", "--out", str(tmp / "rm_tp2"), *base, *RM, *tp2],
        ["policy", "train", "--out", str(tmp / "ppo_dp2"), *pol, *PPO_GREEDY],
        ["policy", "train", "--out", str(tmp / "rloo_tp2"), *pol, *RLOO, *tp2],
        ["policy", "train", "--out", str(tmp / "dpo_tp2"), *pol, *DPO, *tp2],
    ]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    torchrun([str(REPO / "tests/parallel/run_stages.py"), str(tmp / "jobs.json")], tmp, timeout=600)
    # 2-D mesh: FSDP2 over dp=2 of TP=2 shards (4 processes; FSDP's strided shards of TP weights).
    (tmp / "jobs4.json").write_text(json.dumps([["rm", "train", "--out", str(tmp / "rm_dp2tp2"), *base, *RM, *tp2]]))
    torchrun([str(REPO / "tests/parallel/run_stages.py"), str(tmp / "jobs4.json")], tmp, nproc=4, timeout=600)
    return tmp


def _max_diff(a_path, b_path):
    a, b = load_file(a_path), load_file(b_path)
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _last_metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["tag"] == "train"][-1]


@pytest.mark.parametrize("layout", ["dp2", "tp2"])
def test_sft_under_torchrun_equals_single_process(runs, layout):
    single, par = runs / "sft_1" / "model", runs / f"sft_{layout}" / "model"
    assert _max_diff(single / "model.safetensors", par / "model.safetensors") < 1e-5
    assert abs(_last_metrics(runs / "sft_1")["loss"] - _last_metrics(runs / f"sft_{layout}")["loss"]) < 1e-5


@pytest.mark.parametrize("layout", ["dp2", "tp2", "dp2tp2"])
def test_rm_train_under_torchrun_equals_single_process(runs, layout):
    assert_rm_runs_equal(runs / "rm_1", runs / f"rm_{layout}")


def assert_rm_runs_equal(single, par):
    """Two RM training runs' heads, backbone, Eq. 11 statistics (gathered over the global batch, so
    they agree too) and last metrics row, within fp32 tolerance."""
    assert _max_diff(single / "heads.safetensors", par / "heads.safetensors") < 1e-5
    assert _max_diff(single / "backbone" / "model.safetensors", par / "backbone" / "model.safetensors") < 1e-5
    s1, s2 = (json.loads((d / "mapping_stats.json").read_text()) for d in (single, par))
    flat = lambda x: torch.tensor([v for v in _numbers(x)])  # noqa: E731
    assert torch.allclose(flat(s1), flat(s2), atol=1e-5)
    m1, m2 = _last_metrics(single), _last_metrics(par)
    assert m1["step"] == m2["step"] and abs(m1["loss"] - m2["loss"]) < 1e-5
    assert abs(m1["grad_norm"] - m2["grad_norm"]) < 1e-4


def _numbers(x):
    if isinstance(x, dict):
        for k in sorted(x):
            yield from _numbers(x[k])
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield float(x)


@pytest.mark.parametrize("run", ["ppo_dp2", "rloo_tp2", "dpo_tp2"])
def test_policy_loop_under_torchrun_equals_single_process(runs, run):
    single = runs / f"{run.split('_')[0]}_1"
    par = runs / run
    init = runs / "sft_1" / "model" / "model.safetensors"
    assert _max_diff(single / "policy" / "model.safetensors", init) > 1e-5  # training moved the policy
    assert _max_diff(single / "policy" / "model.safetensors", par / "policy" / "model.safetensors") < 1e-5
    m1, m2 = _last_metrics(single), _last_metrics(par)
    for key in ("reward", "kl", "pg_loss", "dpo_loss", "policy_grad_norm", "value_loss", "response_length"):
        if key in m1:
            assert abs(m1[key] - m2[key]) < 1e-4 * max(1.0, abs(m1[key])), key
    assert {k for k in m1 if k.startswith("reward_")} == {k for k in m2 if k.startswith("reward_")}
    # Each rank's hf engine holds its own copy, refreshed by the streamed full tensors of the sharded
    # actor: the stale-weight guard's probe and rollout comparisons see the trainer's weights exactly.
    for row in (json.loads(line) for line in (par / "metrics.jsonl").read_text().splitlines()):
        if row["tag"] == "train":
            assert row["rollout/probe_logprob_abs_diff_max"] < 1e-4 and row["rollout/logprob_abs_diff_max"] < 1e-4, row


@pytest.mark.parametrize("single,par", [("sft_1", "sft_dp2"), ("sft_1", "sft_tp2"), ("rm_1", "rm_dp2"),
                                        ("rm_1", "rm_tp2"), ("rm_1", "rm_dp2tp2"), ("ppo_1", "ppo_dp2"),
                                        ("rloo_1", "rloo_tp2"), ("dpo_1", "dpo_tp2")])
def test_torchrun_stage_writes_one_profile_over_all_ranks(runs, single, par):
    """Rank 0 writes one profile.json for the world: the device count is the world size, and the
    tokens summed over dp replicas (tp ranks counted once) equal the single process's."""
    p1, p2 = (json.loads((runs / d / "profile.json").read_text()) for d in (single, par))
    world = 4 if par.endswith("dp2tp2") else 2
    assert p1["devices"]["count"] == 1 and p2["devices"]["count"] == world
    assert f"× {world} rank(s)" in p2["device_hours"]["counted_as"]
    assert p2["tokens"]["total"] == p1["tokens"]["total"] > 0
    assert p2["tokens"]["per_second_per_device"] == pytest.approx(p2["tokens"]["total"] / p2["wall_seconds"] / world)
    # Per-rank batches have their own mean length, so only the attention term's context differs.
    assert p2["flops"]["total"] == pytest.approx(p1["flops"]["total"], rel=0.05)
    assert sum(p2["phases"]["seconds"].values()) <= p2["wall_seconds"]
    assert not list((runs / par).glob("profile*.json"))[1:]  # one file, not one per rank
