"""``moslim sft train``, ``moslim rm train`` and ``moslim policy train`` under ``torchrun
--nproc_per_node=2`` with parallel.pp=2 (gloo; one decoder layer per stage) equal the single-process
runs of the same config: final weights, last loss and — for the RM, whose calibration pass and final
evaluation run through the pipeline's forward — the Eq. 11 mapping statistics. SFT with 4
micro-batches per step (1F1B), the RM with the default pp of them (GPipe), also on pp=2 × dp=2: each
micro loss is weighted by its share of the batch. The policy loop (2 steps, micro-batches of 2 rows:
4 per update step) with its actor, PPO critic, frozen reference and RM as pipeline engines: RLOO under
GPipe and under 1F1B (with resumable checkpoints and HF saves every step), greedy PPO and Online-DPO
under 1F1B (whose one-row weight-push probe runs the forward's GPipe fallback), and on 4 processes
greedy PPO on pp=2 × dp=2 and RLOO on pp=2 × tp=2 — every metrics row, the final policy and the
profile's token count."""

import json

import pytest

from moslim_mega.config import load_config
from moslim_mega.policy.controller import train_policy
from moslim_mega.prefs import spec_from_config
from moslim_mega.reward.trainer import train_reward_model
from moslim_mega.sft import train_sft
from moslim_mega.world.build import build_world

from .test_equivalence import REPO, torchrun
from .test_torchrun_stages import (DPO, POLICY, PPO_GREEDY, RLOO, RM, SFT, _last_metrics, _max_diff,
                                   assert_rm_runs_equal)

pytestmark = pytest.mark.slow

# Two decoder layers (one per stage) and several optimizer steps (test_torchrun_stages runs one).
LAYERS = ["sft.model.num_layers=2", "rm.model.num_layers=2", "sft.epochs=1", "rm.epochs=0.5"]
# The policy runs: 8 rollout rows per step in micro-batches of 2, i.e. 4 per pipelined update step.
POLICY_PP = POLICY + ["policy.micro_batch_size=2"]
SAVES = ["policy.save_every=1", "checkpoint.every=1"]  # HF saves and DCP checkpoints after every step
# run name → (single-process run it must equal, its algorithm's overrides, pp-only overrides)
POLICY_RUNS = {
    "rloo_gpipe": ("rloo_1", RLOO + SAVES, ["parallel.pp_schedule=gpipe"]),
    "rloo_1f1b": ("rloo_1", RLOO + SAVES, ["parallel.pp_schedule=1f1b", "parallel.pp_microbatches=4"]),
    "ppo_1f1b": ("ppo_1", PPO_GREEDY, ["parallel.pp_schedule=1f1b"]),
    "dpo_1f1b": ("dpo_1", DPO, ["parallel.pp_schedule=1f1b"]),
}
POLICY_RUNS_4 = {  # on 4 processes
    "ppo_dp2": ("ppo_1", PPO_GREEDY, ["parallel.dp=2"]),
    "rloo_tp2": ("rloo_1", RLOO + SAVES, ["parallel.tp=2", "parallel.pp_schedule=gpipe"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp_stages")
    base = ["run.tensorboard=false", f"run.data_dir={tmp / 'data'}"]
    cfg0 = load_config(None, base + ["world.num_rm_prompts=40", "world.num_rm_eval_prompts=8", "world.num_sft=64",
                                      "world.num_policy_prompts=16"])
    paths = build_world(cfg0.world, spec_from_config(cfg0.prefs), tmp / "data")
    train_sft(load_config(None, base + SFT + LAYERS), paths["sft"], tmp / "sft_1", show_progress=False)
    train_reward_model(load_config(None, base + RM + LAYERS), tmp / "rm_1", show_progress=False)
    pol = base + [f"policy.init={tmp / 'sft_1' / 'model'}", f"policy.rm_dir={tmp / 'rm_1'}",
                  f"policy.prompts={paths['policy_train']}"] + POLICY_PP
    for single, extra in {single: extra for single, extra, _ in POLICY_RUNS.values()}.items():
        c = load_config(None, pol + extra)
        train_policy(c, tmp / single, c.policy.init, c.policy.rm_dir, c.policy.prompts, show_progress=False)
    pp = ["parallel.pp=2"]
    jobs = [
        ["sft", "train", "--data", str(paths["sft"]), "--out", str(tmp / "sft_pp2"), *base, *SFT, *LAYERS, *pp,
         "parallel.pp_schedule=1f1b", "parallel.pp_microbatches=4"],
        ["rm", "train", "--out", str(tmp / "rm_pp2"), *base, *RM, *LAYERS, *pp, "parallel.pp_schedule=gpipe"],
        *(["policy", "train", "--out", str(tmp / f"{name}_pp2"), *pol, *extra, *pp, *pp_extra]
          for name, (_, extra, pp_extra) in POLICY_RUNS.items()),
    ]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    torchrun([str(REPO / "tests/parallel/run_stages.py"), str(tmp / "jobs.json")], tmp, timeout=600)
    # 2-D mesh: pp=2 × dp=2 (4 processes): each dp index pipelines its own shard of the batch.
    # Policy on 4 processes: greedy PPO on pp=2 × dp=2 (each dp index pipelines its own prompts) and
    # RLOO on pp=2 × tp=2 (the rollout of the pp × tp group's first rank reaches all four ranks).
    (tmp / "jobs4.json").write_text(json.dumps([
        ["rm", "train", "--out", str(tmp / "rm_pp2dp2"), *base, *RM, *LAYERS, *pp, "parallel.dp=2"],
        *(["policy", "train", "--out", str(tmp / f"{name}_pp2"), *pol, *extra, *pp, *pp_extra]
          for name, (_, extra, pp_extra) in POLICY_RUNS_4.items()),
    ]))
    torchrun([str(REPO / "tests/parallel/run_stages.py"), str(tmp / "jobs4.json")], tmp, nproc=4, timeout=600)
    return tmp


def test_sft_under_pp2_equals_single_process(runs):
    single, par = runs / "sft_1" / "model", runs / "sft_pp2" / "model"
    assert _max_diff(single / "model.safetensors", par / "model.safetensors") < 1e-5
    m1, m2 = _last_metrics(runs / "sft_1"), _last_metrics(runs / "sft_pp2")
    assert m1["step"] == m2["step"] and abs(m1["loss"] - m2["loss"]) < 1e-5


@pytest.mark.parametrize("layout", ["pp2", "pp2dp2"])
def test_rm_train_under_pp2_equals_single_process(runs, layout):
    single, par = runs / "rm_1", runs / f"rm_{layout}"
    assert_rm_runs_equal(single, par)
    e1, e2 = (json.loads((d / "eval.json").read_text())["mean"] for d in (single, par))
    assert e1.keys() == e2.keys() and all(abs(e1[k] - e2[k]) < 1e-5 for k in e1 if isinstance(e1[k], float))


def _train_rows(run_dir):
    return [r for r in (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["tag"] == "train"]


@pytest.mark.parametrize("run", [*POLICY_RUNS, *POLICY_RUNS_4])
def test_policy_loop_under_pp2_equals_single_process(runs, run):
    single, par = runs / {**POLICY_RUNS, **POLICY_RUNS_4}[run][0], runs / f"{run}_pp2"
    init = runs / "sft_1" / "model" / "model.safetensors"
    assert _max_diff(single / "policy" / "model.safetensors", init) > 1e-5  # training moved the policy
    assert _max_diff(single / "policy" / "model.safetensors", par / "policy" / "model.safetensors") < 1e-5
    rows1, rows2 = _train_rows(single), _train_rows(par)
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] == [0, 1]
    for m1, m2 in zip(rows1, rows2):
        # Every rank's loss functions ran on the last stage only; rank 0 logs the rows it broadcast.
        for key in ("reward", "kl", "pg_loss", "entropy", "dpo_loss", "dpo_pairs", "policy_grad_norm", "value_loss",
                    "critic_grad_norm", "response_length"):
            if key in m1:
                assert abs(m1[key] - m2[key]) < 1e-4 * max(1.0, abs(m1[key])), (m1["step"], key, m1[key], m2[key])
        assert {k for k in m1 if k.startswith("reward_")} == {k for k in m2 if k.startswith("reward_")}
        # Each rank's hf engine holds a full copy refreshed from the stages' streamed tensors: the
        # probe after each push and the rollout batch see the trainer's (pipelined) log-probs.
        assert m2["rollout/probe_logprob_abs_diff_max"] < 1e-4 and m2["rollout/logprob_abs_diff_max"] < 1e-4, m2
    p1, p2 = (json.loads((d / "profile.json").read_text()) for d in (single, par))
    assert p2["tokens"]["total"] == p1["tokens"]["total"] > 0  # both pp ranks saw one data shard: counted once


def test_policy_checkpoints_under_pp2(runs):
    """policy.save_every and checkpoint.every under pp: the HF save after step 1 streams the stages'
    weights to rank 0 (equal to the single process's), and both pp ranks wrote their stage's keys
    into each DCP checkpoint."""
    for run in ("rloo_gpipe", "rloo_1f1b"):
        par = runs / f"{run}_pp2"
        assert _max_diff(runs / "rloo_1" / "checkpoints" / "step_1" / "model.safetensors",
                         par / "checkpoints" / "step_1" / "model.safetensors") < 1e-5
        for step in (1, 2):
            ckpt = par / "ckpt" / f"step_{step}"
            assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
            assert (ckpt / "assets" / "actor" / "config.json").is_file()
