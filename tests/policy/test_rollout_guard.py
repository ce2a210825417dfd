"""The stale-weight guard and the rollout-correction plumbing of the policy loop, end to end on a
tiny world (CPU), with an HF engine that holds its *own* copy of the actor — the situation of a
torchrun rank or a vLLM engine — so that a weight push that does not take leaves it stale."""

import copy
import json

import pytest

from moslim_mega.config import ConfigError, load_config
from moslim_mega.policy import controller
from moslim_mega.policy.controller import train_policy
from moslim_mega.rollout import HFEngine
from moslim_mega.rollout.guard import StaleWeightsError

from tiny_stage import build_tiny_stage

TINY = ["hidden_size=32", "intermediate_size=64", "num_layers=1", "num_heads=2"]
SMALL = [f"sft.model.{x}" for x in TINY] + [f"rm.model.{x}" for x in TINY] + [
    "run.tensorboard=false", "sft.epochs=1", "sft.batch_size=16", "sft.warmup_steps=1", "sft.lr=0.01",
    "rm.epochs=1", "rm.batch_size=16", "rm.eval_every=0", "rm.warmup_steps=1",
    "policy.steps=3", "policy.prompts_per_step=4", "policy.samples_per_prompt=2", "policy.mini_batch_size=8",
    "policy.eval_every=0", "sampling.max_new_tokens=6", "profile.enabled=false",
    # A learning rate that visibly moves the weights in one step (AdamW steps ≈ lr per weight).
    "policy.lr=0.05", "policy.warmup_steps=0",
]


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    built = build_tiny_stage(tmp_path_factory.mktemp("guard_stage"), SMALL)
    return {"overrides": built["overrides"], "init": built["sft_dir"], "rm": built["rm_dir"],
            "prompts": built["paths"]["policy_train"]}


class CopyEngines:
    """Replaces the controller's factory: an HF engine over a deep copy of the actor. With
    ``skip_after`` = k, every push after the first k is silently dropped (the fault under test)."""

    def __init__(self, monkeypatch, skip_after: int | None = None):
        self.engines: list[HFEngine] = []
        self.skip_after = skip_after
        monkeypatch.setattr(controller, "build_rollout_engine", self.build)

    def build(self, rc, *, model, tokenizer, model_dir):
        engine = HFEngine(copy.deepcopy(model), tokenizer)
        real, calls = engine.update_weights, []

        def update_weights(named):
            calls.append(1)
            if self.skip_after is not None and len(calls) > self.skip_after:
                for _ in named:  # consume the stream (a real engine would), keep nothing
                    pass
                return
            real(named)

        engine.update_weights = update_weights
        self.engines.append(engine)
        return engine


def _train(stage, out, *extra):
    cfg = load_config(None, stage["overrides"] + list(extra))
    return train_policy(cfg, out, stage["init"], stage["rm"], stage["prompts"], show_progress=False)


def _rows(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["tag"] == "train"]


def test_with_the_push_the_guard_stays_quiet_and_logs_tiny_differences(stage, tmp_path, monkeypatch):
    engines = CopyEngines(monkeypatch)
    summary = _train(stage, tmp_path, "policy.algo=rloo")
    assert summary["steps"] == 3
    engine = engines.engines[0]
    assert engine.pushes == 4 and engine.tensors_copied > 0  # setup + one per step, real copies
    for r in _rows(tmp_path):
        for key in ("rollout/logprob_abs_diff_mean", "rollout/probe_logprob_abs_diff_mean"):
            assert 0 <= r[key] < 1e-4, (key, r[key])
        assert r["rollout/logprob_abs_diff_max"] >= r["rollout/logprob_abs_diff_mean"]
        assert 0 <= r["rollout/mismatch_kl"] < 1e-6


def test_skipped_push_is_caught_by_the_probe_in_the_same_step(stage, tmp_path, monkeypatch):
    CopyEngines(monkeypatch, skip_after=1)  # the setup push works, step 0's push is dropped
    with pytest.raises(StaleWeightsError, match=r"^step 0 \(probe after the weight push\): the rollout weights are "
                                                r"stale — the hf engine's .* > rollout.max_logprob_diff=0.1"):
        _train(stage, tmp_path, "policy.algo=rloo")


def test_skipped_push_without_probe_is_caught_on_the_next_rollout(stage, tmp_path, monkeypatch):
    CopyEngines(monkeypatch, skip_after=1)
    with pytest.raises(StaleWeightsError, match=r"^step 1 \(rollout batch\): the rollout weights are stale"):
        _train(stage, tmp_path, "policy.algo=ppo", "rollout.probe=false")
    assert [r["step"] for r in _rows(tmp_path)] == [0]


def test_with_truncation_the_rollout_batch_is_logged_not_enforced(stage, tmp_path, monkeypatch):
    # top-k renormalises the sampler's log-probs, so they legitimately differ from the trainer's
    # full softmax: the per-step check only logs them (the probe, untruncated, is what enforces).
    CopyEngines(monkeypatch, skip_after=1)
    _train(stage, tmp_path, "policy.algo=rloo", "rollout.probe=false", "sampling.top_k=5")
    diffs = [r["rollout/logprob_abs_diff_mean"] for r in _rows(tmp_path)]
    assert diffs[1] > 0.1 and diffs[2] > 0.1  # stale (and truncated) but not stopped, by design


@pytest.mark.parametrize("mode", ["token_tis", "seq_tis"])
def test_rollout_correction_is_logged_per_step(stage, tmp_path, mode):
    _train(stage, tmp_path, "policy.algo=rloo", f"policy.rollout_correction={mode}",
           "policy.rollout_correction_cap=1.5")
    for r in _rows(tmp_path):
        # The shared-module HF engine samples from the trainer's own weights: ratios ≈ 1, none capped.
        assert abs(r["rollout/tis_weight_mean"] - 1) < 1e-3 and r["rollout/tis_capped_frac"] == 0


def test_rollout_correction_is_refused_for_online_dpo(stage, tmp_path):
    with pytest.raises(ConfigError, match=r"policy.rollout_correction=token_tis: .*Online-DPO"):
        _train(stage, tmp_path, "policy.algo=online_dpo", "policy.rollout_correction=token_tis")


def test_sleep_and_wake_up_bracket_each_training_phase(stage, tmp_path, monkeypatch):
    engines = CopyEngines(monkeypatch)
    calls = []
    real_build = engines.build

    def build(rc, **kw):
        engine = real_build(rc, **kw)
        for name in ("sleep", "wake_up", "update_weights", "generate"):
            real = getattr(engine, name)
            setattr(engine, name, lambda *a, _n=name, _r=real, **k: (calls.append(_n), _r(*a, **k))[1])
        return engine

    monkeypatch.setattr(controller, "build_rollout_engine", build)
    _train(stage, tmp_path, "policy.algo=rloo", "rollout.sleep_level=1", "policy.steps=2")
    # setup push + probe, then per step: rollout → sleep (training) → wake → push → probe
    step = ["generate", "sleep", "wake_up", "update_weights", "generate"]
    assert calls == ["update_weights", "generate"] + step * 2
    assert engines.engines[0].sleep_calls == [1, 1] and not engines.engines[0].asleep
