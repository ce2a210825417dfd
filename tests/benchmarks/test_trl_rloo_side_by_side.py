"""benchmarks/trl_rloo_side_by_side.py does not rot: its summary arithmetic, its workload checks,
the read-back of TRL's settings against moslim's (which must catch a drifted knob), and one tiny
end-to-end invocation writing the JSON. The TRL parts skip when trl (the `bench` extra) is absent."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tiny_stage import build_tiny_stage

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "trl_rloo_side_by_side.py"

TINY = ["hidden_size=32", "intermediate_size=64", "num_layers=1", "num_heads=2"]
OVERRIDES = [f"sft.model.{x}" for x in TINY] + [f"rm.model.{x}" for x in TINY] + [
    "run.tensorboard=false", "run.num_threads=1", "sft.epochs=1", "sft.batch_size=16", "rm.epochs=1",
    "rm.batch_size=16", "rm.eval_every=0"]


def _load():
    spec = importlib.util.spec_from_file_location("trl_rloo_side_by_side", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module by name
    spec.loader.exec_module(mod)
    return mod


bench = _load()


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    built = build_tiny_stage(tmp_path_factory.mktemp("trl_bench"), OVERRIDES)
    return {"policy": str(built["sft_dir"]), "rm_dir": str(built["rm_dir"]),
            "prompts": str(built["paths"]["policy_train"])}


def _run(side, seconds, gen_s, upd_s, gen_tok, upd_tok, peak):
    steps = [{"seconds": s, "cpu_seconds": 2 * s, "generation": g, "scoring": 0.01, "update": u, "generated_tokens": gt,
              "update_tokens": ut} for s, g, u, gt, ut in zip(seconds, gen_s, upd_s, gen_tok, upd_tok)]
    return {"side": side, "steps": steps, "peak_rss_bytes": peak, "rss_at_train_start_bytes": peak // 2,
            "cuda_max_allocated_bytes": None, "mean_response_length": 5.0, "final_reward": 0.0}


def test_summary_skips_warmup_and_takes_ratio_of_medians(stage):
    w = bench.Workload(**stage, steps=5, warmup=1)
    # Step 0 (warm-up) is 100× slower: it must not count. Tokens/s: the median of the timed steps' rates
    # (a stalled step must not drag it, as a ratio of sums would: 40 / 0.6 here).
    moslim = [_run("moslim", [9.0, 0.2, 0.4, 0.3], [9.0, 0.1, 0.1, 0.4], [9.0, 0.05, 0.05, 0.1],
                   [1, 10, 10, 20], [1, 50, 50, 100], 1000)] * 3
    trl = [_run("trl", [9.0, 0.6, 0.6, 0.9], [9.0, 0.2, 0.2, 0.4], [9.0, 0.1, 0.1, 0.2],
                [1, 10, 10, 20], [1, 50, 50, 100], 3000)] * 3
    out = bench.summarize(w, {"moslim": moslim, "trl": trl})
    m, t = out["moslim"]["median_over_repeats"], out["trl"]["median_over_repeats"]
    assert m["seconds_per_step"] == pytest.approx(0.3) and t["seconds_per_step"] == pytest.approx(0.6)
    assert m["cpu_seconds_per_step"] == pytest.approx(0.6)
    assert m["rollout_tokens_per_s"] == pytest.approx(100.0)
    assert m["update_tokens_per_s"] == pytest.approx(1000.0)
    assert m["phase_seconds_per_step"]["other"] == pytest.approx((0.9 - 0.6 - 0.03 - 0.2) / 3)
    r = out["ratio_trl_over_moslim"]
    assert r["seconds_per_step"] == pytest.approx(2.0) and r["peak_rss_bytes"] == pytest.approx(3.0)
    assert r["rollout_tokens_per_s"] == pytest.approx(0.5) and r["cpu_seconds_per_step"] == pytest.approx(2.0)


def test_workload_checks_name_the_field(stage):
    with pytest.raises(bench.BenchError, match="micro_batch_size"):
        bench.Workload(**stage, prompts_per_step=4, samples_per_prompt=2, micro_batch_size=3).validate()
    with pytest.raises(bench.BenchError, match="steps"):
        bench.Workload(**stage, steps=3, warmup=2).validate()
    with pytest.raises(bench.BenchError, match="rm_dir"):
        bench.Workload(**{**stage, "rm_dir": "/nonexistent"}).validate()


def test_trl_settings_read_back_equal_moslim_and_drift_is_caught(stage, tmp_path):
    pytest.importorskip("trl")
    w = bench.Workload(**stage, steps=3, warmup=1, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=5,
                       micro_batch_size=4, threads=1).validate()
    import torch

    torch.set_num_threads(1)
    trainer, tok, prompts = bench.build_trl_trainer(w, tmp_path / "trl")
    matched = bench.check_trl_matched(trainer, tok, w, prompts)
    assert matched["generation_batch_size"] == 8 and matched["beta (KL coef, in the reward, k1)"] == 0.02
    # The reward function is this project's mapped reward: the same numbers RewardWorker gives.
    from moslim_mega.policy.workers import RewardWorker  # noqa: F401  (imported by the script)
    reward_fn = trainer.reward_funcs[0]
    convo = [[{"role": "user", "content": prompts[0]}]] * 2
    got = reward_fn(prompts=convo, completions=[[{"role": "assistant", "content": "a b"}]] * 2)
    assert len(got) == 2 and got[0] == got[1]
    trainer.beta = 0.05  # a drifted KL coefficient must not go unnoticed
    with pytest.raises(bench.BenchError, match="beta"):
        bench.check_trl_matched(trainer, tok, w, prompts)
    trainer.beta = w.kl_coef
    trainer.generation_config.top_k = 50  # HF's usual default, which would change the sampler
    with pytest.raises(bench.BenchError, match="top_k"):
        bench.check_trl_matched(trainer, tok, w, prompts)


@pytest.mark.slow
def test_one_tiny_invocation_writes_both_sides_and_the_ratio(stage, tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "bench.json"
    rc = bench.main(["--out", str(out), "--work", str(tmp_path / "work"), "--policy", stage["policy"],
                     "--rm", stage["rm_dir"], "--prompts", stage["prompts"], "--steps", "3", "--warmup", "1",
                     "--repeats", "1", "--prompts-per-step", "4", "--samples-per-prompt", "2",
                     "--max-new-tokens", "5", "--micro-batch-size", "4", "--threads", "1"])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["schema"] == bench.SCHEMA and data["timing"]["timed_steps_per_run"] == 1
    assert data["mismatches"] and data["matched_settings_trl"]["num_generations"] == 2
    assert data["machine"]["trl"] and data["machine"]["torch"]
    for side in bench.SIDES:
        med = data[side]["median_over_repeats"]
        (run,) = data[side]["runs"]
        assert run["timed_steps"] == 1
        assert med["seconds_per_step"] > 0 and med["rollout_tokens_per_s"] > 0 and med["update_tokens_per_s"] > 0
        assert med["peak_rss_bytes"] >= med["rss_at_train_start_bytes"] > 0
        # 8 rows of at most 5 new tokens each were generated per step.
        assert 0 < run["generated_tokens_per_step"] <= 8 * 5
        assert run["phase_seconds_per_step"]["other"] >= -1e-6
    m, t = data["moslim"]["median_over_repeats"], data["trl"]["median_over_repeats"]
    assert data["ratio_trl_over_moslim"]["seconds_per_step"] == pytest.approx(t["seconds_per_step"] / m["seconds_per_step"])
