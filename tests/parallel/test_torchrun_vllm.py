"""A 2-process ``torchrun`` (gloo) RLOO run with FSDP2 (parallel.dp=2) and ``rollout.engine=vllm``
trains, and its metrics agree with the HF engine's run of the same config within sampling noise.

The two runs cannot be equal: vLLM samples with its own per-request generators, the HF engine with
``torch.multinomial`` under ``torch.manual_seed`` — different responses from the same seeds. So:
  * exactly (fp32 noise) on both, every step: the stale-weight guard's |rollout − trainer| log-prob
    differences, on the rollout batch and on the probe after each push, are < 1e-4 — each rank's
    engine samples from the weights the sharded trainer just streamed to it;
  * statistically: for reward, kl and response length, the mean over the steps of the vLLM run is
    within K standard errors of the HF run's, the standard error being the step-to-step spread of
    both runs (std over steps / sqrt(steps), combined in quadrature). Each step's value is a mean
    over 32 sampled responses, so this spread is mostly the sampling noise of one step's estimate.
    K = 4: a false alarm has probability < 1e-4 for independent normal step means. Measured
    (2026-12-01, CPU, seeds 0/1/2, hf vs vllm): reward 0.115/0.097/0.062 vs 0.083/0.087/0.048 (step
    sd ≈ 0.1), kl 0.30/0.45/0.53 vs 0.53/0.27/0.49 (sd ≈ 0.3), length 10.8/10.5/11.2 vs 11.0/10.8/10.9.
    Not compared: the policy entropy — it random-walks with training (one run drifts by 0.06 over 12
    steps while its step-to-step sd is 0.004–0.02, for either engine), so the spread understates it.
    This check is weak by design (a tiny policy's reward hardly depends on how it samples; even the vLLM run
    with sampling.temperature=1.6 instead of 1 passed it): what a sampler error would break is caught first by the
    log-prob checks above and by tests/rollout/test_vllm_engine.py.
"""

import json
import math
import statistics

import pytest
from safetensors.torch import load_file

from moslim_mega.config import load_config
from moslim_mega.prefs import spec_from_config
from moslim_mega.reward.trainer import train_reward_model
from moslim_mega.sft import train_sft
from moslim_mega.world.build import build_world

from .test_equivalence import REPO, torchrun

pytest.importorskip("vllm", reason="vLLM is not importable here (install the extra: pip install -e .[vllm])")

pytestmark = pytest.mark.slow

# head_dim 32: vLLM's CPU attention kernels take 32, 64, 80, 96, 112, 128, ...
TINY = ["model.hidden_size=64", "model.intermediate_size=128", "model.num_heads=2"]
SFT = [f"sft.{o}" for o in TINY] + ["sft.batch_size=16", "sft.epochs=3", "sft.warmup_steps=2"]
RM = [f"rm.{o}" for o in TINY] + ["rm.batch_size=16", "rm.epochs=0.2", "rm.eval_every=0", "rm.warmup_steps=2"]
STEPS = 12
RLOO = ["policy.algo=rloo", f"policy.steps={STEPS}", "policy.prompts_per_step=16", "policy.samples_per_prompt=2",
        "policy.mini_batch_size=8", "sampling.max_new_tokens=12", "policy.eval_every=0", "parallel.dp=2",
        "policy.lr=0.001", "policy.warmup_steps=0", f"rollout.kv_cache_memory_bytes={32 << 20}"]
K = 4.0
FP32_NOISE = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_dp2")
    base = ["run.tensorboard=false", f"run.data_dir={tmp / 'data'}", "profile.enabled=false"]
    cfg0 = load_config(None, base + ["world.num_rm_prompts=40", "world.num_rm_eval_prompts=8", "world.num_sft=64",
                                      "world.num_policy_prompts=32"])
    paths = build_world(cfg0.world, spec_from_config(cfg0.prefs), tmp / "data")
    train_sft(load_config(None, base + SFT), paths["sft"], tmp / "sft", show_progress=False)
    train_reward_model(load_config(None, base + RM), tmp / "rm", show_progress=False)
    pol = base + [f"policy.init={tmp / 'sft' / 'model'}", f"policy.rm_dir={tmp / 'rm'}",
                  f"policy.prompts={paths['policy_train']}"] + RLOO
    jobs = [["policy", "train", "--out", str(tmp / engine), *pol, f"rollout.engine={engine}"]
            for engine in ("hf", "vllm")]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    torchrun([str(REPO / "tests/parallel/run_stages.py"), str(tmp / "jobs.json")], tmp, timeout=900)
    return tmp


def _train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["tag"] == "train"]


def test_vllm_dp2_run_trains_with_fresh_weights_every_step(runs):
    for engine in ("hf", "vllm"):
        rows = _train_rows(runs / engine)
        assert [r["step"] for r in rows] == list(range(STEPS)), engine
        for r in rows:  # every rank's engine samples from the weights the FSDP2 trainer just pushed
            for key in ("rollout/logprob_abs_diff_max", "rollout/probe_logprob_abs_diff_max"):
                assert 0 <= r[key] < FP32_NOISE, (engine, r["step"], key, r[key])
    init = load_file(runs / "sft" / "model" / "model.safetensors")
    final = load_file(runs / "vllm" / "policy" / "model.safetensors")
    assert max(float((init[k] - final[k]).abs().max()) for k in init) > 1e-3  # the policy trained


@pytest.mark.parametrize("key", ["reward", "kl", "response_length"])
def test_vllm_dp2_metrics_match_the_hf_engine_within_sampling_noise(runs, key):
    a = [r[key] for r in _train_rows(runs / "hf")]
    b = [r[key] for r in _train_rows(runs / "vllm")]
    se = math.sqrt((statistics.pstdev(a) ** 2 + statistics.pstdev(b) ** 2) / STEPS)
    diff = abs(statistics.fmean(a) - statistics.fmean(b))
    # A floor for a metric that barely moves (kl near 0 in both runs): 1e-3 of its scale.
    bound = K * se + 1e-3 * max(1.0, abs(statistics.fmean(a)))
    assert diff <= bound, (key, diff, bound, a, b)
