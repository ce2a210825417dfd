"""``moslim compare``: MOSLIM against MORLHF, Rewarded Soups and DPA on the embedded world.

Every method starts from the same neutral SFT policy, trains its reward model(s) with the same
backbone and budget (``rm.*``), trains each of its policies with the same algorithm and budget
(``policy.*``; DPA's RSF draws a comparable number of samples, ``compare.dpa_*``), and is
measured by the world's oracle on the same held-out prompts. Outputs (``report.md``,
``report.json``, PNGs) are analogues of the paper's Table 2, Figures 5-6 and Table 8.

A baseline without a prefix interface reads a MOSLIM prefix as a mix of dimensions (each named
dimension weighted 1, the level dropped — see baselines/common.py): MORLHF answers with its
trained policy nearest to that mix, Rewarded Soups merges its per-dimension policies with
λ ∝ the mix, DPA writes the mix as its unit direction.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path

import numpy as np

from .config import Config, ConfigError, load_config, save_config
from .prefs import spec_from_config
from .world.build import build_world, split_prompt_texts

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
METHODS = ("moslim", "morlhf", "rsoup", "dpa")


def compare_config(quick: bool, overrides=()) -> Config:
    """configs/compare.yaml (compare_quick.yaml with --quick) + user overrides."""
    return load_config(CONFIG_DIR / ("compare_quick.yaml" if quick else "compare.yaml"), list(overrides))


def parse_methods(methods) -> tuple[str, ...]:
    names = [m.strip().lower() for m in (methods.split(",") if isinstance(methods, str) else methods) if m.strip()]
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise ConfigError(f"compare.methods: {bad[0] if bad else 'empty'!r} is not one of {', '.join(METHODS)}")
    return tuple(dict.fromkeys(names))


class StageTimer:
    """Wall-clock seconds per (method, stage); Table 8's compute = wall-clock × devices."""

    def __init__(self):
        self.seconds: dict[str, dict[str, float]] = {}
        self.capped: list[str] = []  # "method/stage" of training stages stopped by their max_minutes

    def bind(self, method: str):
        def run(stage, fn, *args, **kwargs):
            print(f"== {method}: {stage}", flush=True)
            t0 = time.time()
            result = fn(*args, **kwargs)
            self.seconds.setdefault(method, {})[stage] = round(time.time() - t0, 2)
            if isinstance(result, dict) and result.get("stopped_by_max_minutes"):
                self.capped.append(f"{method}/{stage}")
            return result

        return run


class RoutedSampler:
    """``sample_fn(prompts)`` that routes each prefixed prompt to a (policy, text) by ``route``:
    ``route(prompt) -> (key, text)``; ``load(key) -> (rollout engine, tokenizer)``. ``owns=True``: each
    key is loaded once and kept until :meth:`close`; ``owns=False``: ``load`` keeps (and releases) what it returns."""

    def __init__(self, route, load, sampling, seed: int, owns: bool = True):
        self.route, self.load, self.sampling, self.seed, self.owns = route, load, sampling, seed, owns
        self._loaded: dict = {}

    def _engine(self, key):
        if not self.owns:
            return self.load(key)
        if key not in self._loaded:
            self._loaded[key] = self.load(key)
        return self._loaded[key]

    def close(self) -> None:
        """Release the engines this sampler loaded (a vLLM engine holds its KV cache until closed)."""
        for engine, _tok in self._loaded.values():
            engine.close()
        self._loaded = {}

    def __call__(self, prompts: list[str]) -> list[str]:
        from .rollout import generate_texts

        groups: dict = {}
        for i, p in enumerate(prompts):
            key, text = self.route(p)
            groups.setdefault(key, []).append((i, text))
        out = [""] * len(prompts)
        for key, items in groups.items():
            engine, tok = self._engine(key)
            for c in range(0, len(items), 256):
                chunk = items[c : c + 256]
                res = generate_texts(engine, tok, [t for _, t in chunk], 1, self.sampling, seed=self.seed + c)
                for (i, _), r in zip(chunk, res.responses):
                    out[i] = r
        return out


def _nearest(weights, candidates) -> int:
    w = np.asarray(weights, dtype=np.float64)
    sims = [float(w @ np.asarray(c)) / (np.linalg.norm(w) * np.linalg.norm(c)) for c in candidates]
    return int(np.argmax(sims))


def run_compare(cfg: Config, out_dir, methods=None, show_progress: bool = True) -> dict:
    from .baselines.common import parse_weight_vector, write_prefix_free_prompts
    from .eval.compare_report import write_compare_report, format_table
    from .reward.data import read_jsonl
    from .sft import train_sft

    methods = parse_methods(methods or cfg.compare.methods)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    spec = spec_from_config(cfg.prefs)
    timer, t_all = StageTimer(), time.time()
    shared = timer.bind("shared")
    paths = shared("world", build_world, cfg.world, spec, out / "data")
    sft = shared("sft", train_sft, cfg, paths["sft"], out / "sft", show_progress=show_progress)
    data_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, data_dir=str(out / "data")))
    _, eval_texts = split_prompt_texts(cfg.world.seed)
    targeted = [rec for _, rec in read_jsonl(paths["policy_eval"])]
    sampling = dataclasses.replace(cfg.sampling, temperature=cfg.eval.temperature)

    def evaluate(method, sample_fn):
        from .eval.controllability import evaluate_policy

        try:
            return timer.bind(method)("eval", evaluate_policy, sample_fn, eval_texts, spec,
                                      cfg.eval.prompts_per_target, cfg.eval.seed, targeted)
        finally:
            sample_fn.close()  # its engines (one vLLM engine each) go before the next method's start

    def plain(model_dir):
        from .rollout import engine_from_dir

        return RoutedSampler(lambda p: (0, p), lambda _k: engine_from_dir(cfg.rollout, model_dir), sampling,
                             cfg.eval.seed)

    evals = {"sft": evaluate("sft", plain(sft["model_dir"]))}
    extra: dict = {}
    if "moslim" in methods:
        from .policy.controller import train_policy
        from .reward.trainer import train_reward_model

        run = timer.bind("moslim")
        run("rm", train_reward_model, data_cfg, out / "moslim" / "rm", show_progress=show_progress)
        run("policy", train_policy, cfg, out / "moslim" / "policy", sft["model_dir"], out / "moslim" / "rm",
            paths["policy_train"], show_progress=show_progress)
        evals["moslim"] = evaluate("moslim", plain(out / "moslim" / "policy" / "policy"))

    if "morlhf" in methods or "rsoup" in methods:
        from .baselines.morlhf import train_dimension_rms, train_weighted_policy
        from .baselines.common import preference_weights

        owner = "morlhf" if "morlhf" in methods else "rsoup"
        rm_dirs = train_dimension_rms(cfg, spec, out / "data", out / "dim_rms", show_progress, timer.bind(owner))
        if owner == "morlhf" and "rsoup" in methods:  # trained once, the cost belongs to both methods
            timer.seconds["rsoup"] = {k: v for k, v in timer.seconds["morlhf"].items()}
        free = write_prefix_free_prompts(paths["policy_train"], spec, out / "data" / "policy_train_noprefix.jsonl")

        def weighted(method, tag, w):
            d = out / method / f"policy_{tag}"
            timer.bind(method)(f"policy_{tag}", train_weighted_policy, cfg, d, sft["model_dir"], rm_dirs, free, w, spec,
                               show_progress)
            return d / "policy"

        if "morlhf" in methods:
            from .rollout import engine_from_dir

            ws = [parse_weight_vector(t, len(spec), f"compare.morlhf_weights[{i}]")
                  for i, t in enumerate(cfg.compare.morlhf_weights)]
            dirs = [weighted("morlhf", f"w{i}", w) for i, w in enumerate(ws)]

            def route(p):
                w, base = preference_weights(p, spec)
                return _nearest(w, ws), base

            evals["morlhf"] = evaluate("morlhf", RoutedSampler(route, lambda k: engine_from_dir(cfg.rollout, dirs[k]),
                                                               sampling, cfg.eval.seed))
            extra["morlhf_weights"] = [list(w) for w in ws]
        if "rsoup" in methods:
            from .baselines.rsoup import SoupCache

            onehot = [tuple(float(i == j) for j in range(len(spec))) for i in range(len(spec))]
            soup = SoupCache([weighted("rsoup", n, w) for n, w in zip(spec.names, onehot)], out / "rsoup" / "merged",
                             cfg.rollout)

            def route_soup(p):
                w, base = preference_weights(p, spec)
                return tuple(x / sum(w) for x in w), base

            evals["rsoup"] = evaluate("rsoup", RoutedSampler(route_soup, soup.get, sampling, cfg.eval.seed,
                                                             owns=False))
            try:
                extra["rsoup_sweep"] = timer.bind("rsoup")("eval_lambda_sweep", rsoup_sweep, soup, spec, eval_texts,
                                                           cfg, sampling)
            finally:
                soup.close()

    if "dpa" in methods:
        from .baselines.dpa import DPASampler, train_dpa
        from .baselines.regression_rm import train_regression_rm
        from .prefs import strip_prefix

        run = timer.bind("dpa")
        run("rm_regression", train_regression_rm, cfg, out / "data", out / "dpa" / "rm", show_progress=show_progress)
        bases = [strip_prefix(rec["prompt"], spec) for _, rec in read_jsonl(paths["policy_train"])]
        train_dpa(cfg, out / "dpa", sft["model_dir"], out / "dpa" / "rm", bases, paths["sft"], show_progress, run)
        evals["dpa"] = evaluate("dpa", DPASampler(out / "dpa" / "policy", spec, sampling, cfg.eval.seed, cfg.rollout))

    report = build_report(cfg, spec, methods, evals, timer.seconds, extra, time.time() - t_all)
    # A budget is steps, not minutes: a stage that hit its max_minutes safety net ran short — say so.
    report["stopped_by_max_minutes"] = list(timer.capped)
    write_compare_report(out, report)
    print(format_table(report))
    print(f"report: {out / 'report.md'}")
    return report


def _saved_config_matches(cfg: Config, run_dir: Path) -> bool:
    """Whether ``run_dir/config.yaml`` is byte for byte the file run_compare would save for ``cfg``."""
    import tempfile

    if not (run_dir / "config.yaml").is_file():
        return False
    with tempfile.TemporaryDirectory() as tmp:
        return save_config(cfg, tmp).read_text() == (run_dir / "config.yaml").read_text()


def run_compare_seeds(seeds, quick: bool, overrides, out_dir, methods=None, show_progress: bool = True) -> dict:
    """``moslim compare --seeds``: one comparison per ``run.seed`` in ``<out>/seed_<n>/`` (the world,
    ``world.seed``, stays the recipe's), then ``seeds.json``/``seeds.md`` (eval/compare_seeds.py).

    A seed whose directory holds a report.json made with the same config and methods is reused, so an
    interrupted sweep (or one split over several jobs writing the same ``--out``) resumes; a directory
    made with another config is an error, never silently mixed in or overwritten."""
    import json

    from .eval.compare_seeds import write_compare_seeds

    overrides = list(overrides)
    # A run.seed override would give every seed directory the same training seed.
    if any(o.split("=", 1)[0].strip() == "run.seed" for o in overrides):
        raise ConfigError("run.seed: --seeds sets it for each seed; drop the run.seed=... override")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for seed in seeds:
        cfg = compare_config(quick, [*overrides, f"run.seed={seed}"])
        wanted = parse_methods(methods or cfg.compare.methods)
        run_dir = out / f"seed_{seed}"
        # run_compare saves config.yaml first, so a directory left by an interrupted run is checked too.
        if ((run_dir / "config.yaml").is_file() or (run_dir / "report.json").is_file()) \
                and not _saved_config_matches(cfg, run_dir):
            raise ConfigError(f"{run_dir} holds a compare run with another config (its config.yaml differs or is "
                              "missing); use a new --out or remove it")
        if (run_dir / "report.json").is_file():
            report = json.loads((run_dir / "report.json").read_text())
            # --methods is not part of the config: a run of other methods has the same config.yaml.
            if report.get("methods") != list(wanted):
                raise ConfigError(f"{run_dir} holds a compare run of methods {report.get('methods')}, not "
                                  f"{list(wanted)}; use a new --out or remove it")
            print(f"== seed {seed}: reusing {run_dir / 'report.json'}", flush=True)
            reports.append(report)
            continue
        print(f"== seed {seed} → {run_dir}", flush=True)
        run_compare(cfg, run_dir, wanted, show_progress=show_progress)
        reports.append(json.loads((run_dir / "report.json").read_text()))
    summary = write_compare_seeds(out, reports)
    print((out / "seeds.md").read_text())
    return summary


def rsoup_sweep(soup, spec, eval_texts, cfg: Config, sampling) -> dict:
    """Eq. 2's λ sweep between every pair of per-dimension policies: mean oracle scores per λ."""
    from .baselines.rsoup import lambda_grid
    from .eval.controllability import choose_prompts
    from .rollout import generate_texts
    from .world import oracle

    base = choose_prompts(eval_texts, cfg.eval.prompts_per_target, cfg.eval.seed)
    out = {}
    for i, j in itertools.combinations(range(len(spec)), 2):
        rows = []
        for lam in lambda_grid(len(spec), i, j, cfg.compare.rsoup_lambda_steps):
            responses = generate_texts(*soup.get(lam), base, 1, sampling, seed=cfg.eval.seed).responses
            scores = [oracle.score(p, r, spec.names) for p, r in zip(base, responses)]
            rows.append({"lambda": list(lam), "scores": {n: float(np.mean([s[n] for s in scores])) for n in spec.names}})
        out[f"{spec.names[i]}+{spec.names[j]}"] = rows
    return out


def best_methods(scores: dict[str, float], tol: float = 1e-9) -> list[str]:
    """Every method within ``tol`` of the best score (ties are reported as ties)."""
    top = max(scores.values())
    return [m for m, v in scores.items() if v >= top - tol]


def build_report(cfg: Config, spec, methods, evals: dict, seconds: dict, extra: dict, wall: float) -> dict:
    names = list(spec.names)
    ranges = {d.name: [float(d.raw_range[0]), float(d.raw_range[1])] for d in spec.dimensions}
    rows = ["sft", *methods]
    norm = lambda v, d: (v - ranges[d][0]) / (ranges[d][1] - ranges[d][0])  # noqa: E731
    table2 = {m: dict(evals[m]["targeted_max"]) for m in rows}
    for m in rows:
        table2[m]["mean_normalised"] = float(np.mean([norm(table2[m][d], d) for d in names]))
    pair_score = {m: {k: float(np.mean([norm(v[d], d) for d in k.split("+")])) for k, v in evals[m]["pairs"].items()}
                  for m in rows}
    shared = seconds.get("shared", {})
    compute = {}
    for m in rows:
        own = {k: v for k, v in seconds.get(m, {}).items() if not k.startswith("eval")}
        train = sum(own.values()) + (sum(shared.values()) if m != "sft" else shared.get("world", 0) + shared.get("sft", 0))
        compute[m] = {"stages": own, "train_seconds_incl_shared": round(train, 1),
                      "eval_seconds": round(sum(v for k, v in seconds.get(m, {}).items() if k.startswith("eval")), 2),
                      "devices": 1,
                      "device_hours": round(train / 3600, 4)}
    winners = {d: best_methods({m: table2[m][d] for m in methods}) for d in names}
    winners["mean_normalised"] = best_methods({m: table2[m]["mean_normalised"] for m in methods})
    for k in evals[methods[0]]["pairs"]:
        winners[f"pair {k}"] = best_methods({m: pair_score[m][k] for m in methods})
    return {
        "methods": list(methods), "dims": names, "raw_ranges": ranges, "seed": cfg.run.seed,
        "policy_algo": cfg.policy.algo, "policy_steps": cfg.policy.steps, "wall_seconds": round(wall, 1),
        "table2": table2,
        "spearman": {m: {d: evals[m]["controllability"][d]["spearman"] for d in names} for m in rows},
        "controllability": {m: evals[m]["controllability"] for m in rows},
        "pairs": {m: evals[m]["pairs"] for m in rows}, "pair_score": pair_score,
        "untargeted": {m: evals[m]["untargeted"] for m in rows},
        "random_target_mae": {m: evals[m]["random_targets"]["mae_mean"] for m in rows},
        "compute": compute, "shared_stages": shared, "winners": winners, **extra,
    }
