"""``moslim demo``: the whole MOSLIM pipeline on the embedded world, measured by the oracle.

world → neutral SFT (no prefixes) → multi-head RM (+ mapping calibration) → MOSLIM policy
(PPO / RLOO / Online-DPO) → controllability evaluation of the SFT and the MOSLIM policies with
the oracle (never the RM) → report.md, report.json and PNG plots.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .config import Config, SamplingConfig, load_config, save_config
from .eval.overopt import OracleMonitor
from .prefs import spec_from_config
from .world.build import build_world, split_prompt_texts

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def demo_config(algo: str, seed: int, quick: bool, overrides=()) -> Config:
    """configs/demo.yaml (+ demo_quick.yaml with --quick) + --algo/--seed + user overrides."""
    path = CONFIG_DIR / ("demo_quick.yaml" if quick else "demo.yaml")
    return load_config(path, [f"policy.algo={algo}", f"run.seed={seed}", *overrides])


def make_sampler(engine, tokenizer, max_new_tokens: int, temperature: float, seed: int):
    """A ``sample_fn(prompts) -> responses`` over a rollout engine, for the oracle evaluation."""
    from .rollout import generate_texts

    sampling = SamplingConfig(temperature=temperature, max_new_tokens=max_new_tokens)

    def sample(prompts: list[str]) -> list[str]:
        out: list[str] = []
        for i in range(0, len(prompts), 256):
            out += generate_texts(engine, tokenizer, prompts[i : i + 256], 1, sampling, seed=seed + i).responses
        return out

    return sample


def evaluate_policy_dir(policy_dir, cfg: Config, spec, base_prompts, targeted=None) -> dict:
    from .eval.controllability import evaluate_policy
    from .rollout import engine_from_dir

    engine, tok = engine_from_dir(cfg.rollout, policy_dir)
    try:
        sample = make_sampler(engine, tok, cfg.sampling.max_new_tokens, cfg.eval.temperature, cfg.eval.seed)
        return evaluate_policy(sample, base_prompts, spec, cfg.eval.prompts_per_target, cfg.eval.seed, targeted)
    finally:
        engine.close()


def run_demo(cfg: Config, out_dir, show_progress: bool = True) -> dict:
    from .eval.report import format_summary, write_report
    from .policy.controller import train_policy
    from .reward.data import read_jsonl
    from .reward.trainer import train_reward_model
    from .sft import train_sft

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    spec = spec_from_config(cfg.prefs)
    stages: dict[str, float] = {}
    t_all = time.time()

    def stage(name, fn, *args, **kwargs):
        print(f"== {name}")
        t0 = time.time()
        result = fn(*args, **kwargs)
        stages[name] = round(time.time() - t0, 2)
        return result

    paths = stage("world", build_world, cfg.world, spec, out / "data")
    sft = stage("sft", train_sft, cfg, paths["sft"], out / "sft", show_progress=show_progress)
    rm_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, data_dir=str(out / "data")))
    rm_report = stage("rm", train_reward_model, rm_cfg, out / "rm", show_progress=show_progress)
    _, eval_texts = split_prompt_texts(cfg.world.seed)
    targeted = [rec for _, rec in read_jsonl(paths["policy_eval"])]

    def eval_fn(step, sample_fn):
        from .eval.controllability import evaluate_policy

        res = evaluate_policy(sample_fn, eval_texts, spec, max(8, cfg.eval.prompts_per_target // 4), cfg.eval.seed)
        return {f"spearman_{d}": v["spearman"] for d, v in res["controllability"].items()}

    policy = stage("policy", train_policy, cfg, out / "policy", sft["model_dir"], out / "rm", paths["policy_train"],
                   eval_fn=eval_fn, show_progress=show_progress, monitor=OracleMonitor(spec))
    sft_eval = stage("eval_sft", evaluate_policy_dir, sft["model_dir"], cfg, spec, eval_texts, targeted)
    moslim_eval = stage("eval_moslim", evaluate_policy_dir, out / "policy" / "policy", cfg, spec, eval_texts, targeted)
    report = {
        "algo": cfg.policy.algo,
        "seed": cfg.run.seed,
        "wall_seconds": round(time.time() - t_all, 1),
        "controllability": moslim_eval["controllability"],
        "pairs": moslim_eval["pairs"],
        "untargeted": moslim_eval["untargeted"],
        "sft": sft_eval["targeted_max"],
        "moslim": moslim_eval["targeted_max"],
        "sft_eval": sft_eval,
        "moslim_eval": moslim_eval,
        "stages": stages,
        # Gao et al.'s picture on the policy's own samples: RM reward vs oracle reward (issue 18).
        "overoptimisation": policy.get("overoptimisation", {}),
        "rm_eval": {"in_distribution": rm_report["mean"],
                    "ood": rm_report.get("slices", {}).get("ood", {}).get("mean")},
        # A stage that hit its max_minutes safety net ran fewer steps than the recipe says.
        "stopped_by_max_minutes": [name for name, res in (("sft", sft), ("rm", rm_report), ("policy", policy))
                                   if res.get("stopped_by_max_minutes")],
        "steps": {"sft": sft["steps"], "rm": rm_report["steps"], "policy": policy["steps"]},
    }
    write_report(out, report)
    print(format_summary(report))
    print(f"report: {out / 'report.md'}")
    return report


def run_demo_seeds(algo: str, seeds: list[int], quick: bool, overrides, out_dir) -> dict:
    """``moslim demo --seeds``: one demo per seed in ``<out>/seed_<n>/``, then seeds.md/seeds.json.

    A seed whose directory already holds a report.json made with the same config is reused, so
    an interrupted sweep (or one split over several jobs writing the same ``--out``) resumes; a
    directory made with a different config is an error, never silently mixed in."""
    import json
    import tempfile

    from .eval.seeds import write_seed_table

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for seed in seeds:
        cfg = demo_config(algo, seed, quick, overrides)
        run_dir = out / f"seed_{seed}"
        if (run_dir / "report.json").is_file():
            with tempfile.TemporaryDirectory() as tmp:
                save_config(cfg, tmp)
                same = (Path(tmp) / "config.yaml").read_text() == (run_dir / "config.yaml").read_text()
            if not same:
                raise ValueError(f"{run_dir} holds a run with another config; use a new --out or remove it")
            print(f"== seed {seed}: reusing {run_dir / 'report.json'}")
            reports.append(json.loads((run_dir / "report.json").read_text()))
            continue
        print(f"== seed {seed} → {run_dir}")
        run_demo(cfg, run_dir, show_progress=True)
        reports.append(json.loads((run_dir / "report.json").read_text()))
    summary = write_seed_table(out, reports)
    print((out / "seeds.md").read_text())
    return summary
