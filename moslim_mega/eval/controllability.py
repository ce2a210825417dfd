"""Controllability of a prefix-controlled policy, measured with the world's oracle.

Analogues of the paper's evaluation: Figure 5 (sweep the level of one dimension, plot the
achieved score), Figure 6 (every pair of dimensions at max targets) and Table 2 (the score of a
dimension when it is asked for at max). Scores are the oracle's *raw* ratings
(``oracle.score(prompt_without_prefix, response)``), never the reward model's — the policy was
optimised against the RM, so measuring with it would reward its blind spots.

A policy is any ``sample_fn(prompts) -> responses`` (one response per prompt; the prompts carry
the preference prefix). Every target point uses the *same* held-out base prompts, chosen once
from the seed, so that differences between points come from the prefix alone.

Shapes: ``scores_NH`` = [samples, heads] raw ratings in spec order.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Sequence

import numpy as np

from ..prefs import PreferenceSpec, format_prefix, parse_prefix
from ..world import oracle

__all__ = ["EvalError", "SampleFn", "spearman", "choose_prompts", "evaluate_policy", "compare_to_reference"]

SampleFn = Callable[[list[str]], list[str]]


class EvalError(ValueError):
    """Invalid evaluation input: the message names the prompt, record or argument."""


# ---- rank statistics ------------------------------------------------------------------------
def _average_ranks(a_N: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = np.argsort(a_N, kind="mergesort")
    sorted_a = a_N[order]
    # Run boundaries of equal values in sorted order.
    new_run = np.concatenate(([True], sorted_a[1:] != sorted_a[:-1]))
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate((starts[1:], [len(a_N)]))  # exclusive
    mean_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(a_N), dtype=np.float64)
    ranks[order] = mean_rank[run_id]
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ with average ranks for ties; NaN if either side is constant (or < 2 points)."""
    x_N = np.asarray(x, dtype=np.float64).ravel()
    y_N = np.asarray(y, dtype=np.float64).ravel()
    if x_N.shape != y_N.shape:
        raise EvalError(f"spearman: x has {x_N.size} values but y has {y_N.size}")
    if x_N.size < 2 or np.any(np.isnan(x_N)) or np.any(np.isnan(y_N)):
        return math.nan
    rx, ry = _average_ranks(x_N), _average_ranks(y_N)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if denom == 0.0:  # a constant side has zero rank variance
        return math.nan
    return float(np.clip(float(rx @ ry) / denom, -1.0, 1.0))


# ---- sampling ---------------------------------------------------------------------------------
def choose_prompts(base_prompts: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` base prompts chosen by ``random.Random(seed)``; with replacement only if there are too few."""
    if n < 1:
        raise EvalError(f"prompts_per_target must be >= 1, got {n}")
    if not base_prompts:
        raise EvalError("base_prompts is empty")
    rng = random.Random(seed)
    pool = list(base_prompts)
    return rng.sample(pool, n) if n <= len(pool) else rng.choices(pool, k=n)


def _sample_all(sample_fn: SampleFn, groups: list[list[str]], batch_size: int) -> list[list[str]]:
    """Responses for every group of prompts, sent to ``sample_fn`` as few large batches."""
    flat = [p for g in groups for p in g]
    step = batch_size if batch_size > 0 else max(1, len(flat))
    responses: list[str] = []
    for i in range(0, len(flat), step):
        chunk = flat[i : i + step]
        out = list(sample_fn(chunk))
        if len(out) != len(chunk):
            raise EvalError(f"sample_fn returned {len(out)} responses for {len(chunk)} prompts")
        for r in out:
            if not isinstance(r, str):
                raise EvalError(f"sample_fn must return strings, got {type(r).__name__}")
        responses += out
    split, pos = [], 0
    for g in groups:
        split.append(responses[pos : pos + len(g)])
        pos += len(g)
    return split


def _raw_scores(base: list[str], responses: list[str], names: tuple[str, ...]) -> np.ndarray:
    """[N, H] oracle raw ratings, scored against the prompt *without* its prefix."""
    rows = [oracle.score(p, r, names) for p, r in zip(base, responses)]
    return np.array([[row[n] for n in names] for row in rows], dtype=np.float64).reshape(len(rows), len(names))


def _check_inputs(base_prompts: Sequence[str], spec: PreferenceSpec) -> None:
    for name in spec.names:
        if name not in oracle.ORACLE_SCALES:
            raise EvalError(f"the oracle cannot score dimension {name!r}; it knows {', '.join(oracle.ORACLE_SCALES)}")
    for p in base_prompts:
        if not isinstance(p, str):
            raise EvalError(f"base prompt must be a string, got {type(p).__name__}")
        if parse_prefix(p, spec)[0]:
            raise EvalError(f"base prompt {p[:60]!r} already carries a preference prefix")


# ---- the evaluation -----------------------------------------------------------------------------
def evaluate_policy(
    sample_fn: SampleFn,
    base_prompts: list[str],
    spec: PreferenceSpec,
    prompts_per_target: int,
    seed: int,
    targeted_prompts: list[dict] | None = None,
    batch_size: int = 0,
) -> dict:
    """Oracle scores of ``sample_fn`` under single-dimension sweeps, max pairs, no prefix, random targets.

    ``base_prompts`` are held-out prompt texts without prefix; ``targeted_prompts`` are optional
    ``policy_eval.jsonl`` records ``{"prompt": "<..>text", "targets": {dim: level}}``.
    ``batch_size`` caps the prompts per ``sample_fn`` call (0 = everything in one call).
    Returns the dict documented in docs (keys ``controllability``, ``pairs``, ``untargeted``,
    ``targeted_max``, optional ``random_targets``, ``num_prompts``, ...).
    """
    _check_inputs(base_prompts, spec)
    chosen = choose_prompts(base_prompts, prompts_per_target, seed)
    names = spec.names

    # Target points: (key, prefix). Every point reuses `chosen`.
    sweep = [(d.name, c, format_prefix({d.name: c}, spec)) for d in spec.dimensions for c in range(d.num_classes)]
    pair_keys = list(itertools.combinations(names, 2))
    top = {d.name: d.num_classes - 1 for d in spec.dimensions}
    pair_prefixes = [format_prefix({a: top[a], b: top[b]}, spec) for a, b in pair_keys]
    prefixes = [s[2] for s in sweep] + pair_prefixes + [""]
    groups = [[pre + p for p in chosen] for pre in prefixes]

    rt_base, rt_levels = _parse_records(targeted_prompts, spec) if targeted_prompts is not None else ([], [])
    if targeted_prompts is not None:
        groups.append([r["prompt"] for r in targeted_prompts])

    responses = _sample_all(sample_fn, groups, batch_size)
    scores = [_raw_scores(chosen, r, names) for r in responses[: len(prefixes)]]

    controllability = _sweep_summary(spec, sweep, scores[: len(sweep)])
    off = len(sweep)
    pairs = {
        f"{a}+{b}": {n: float(scores[off + i][:, h].mean()) for h, n in enumerate(names)}
        for i, (a, b) in enumerate(pair_keys)
    }
    untargeted = {n: float(scores[-1][:, h].mean()) for h, n in enumerate(names)}
    # "<d max>" alone is the sweep's last point, so Table 2's score reuses it instead of resampling.
    targeted_max = {d: controllability[d]["achieved"][-1] for d in names}
    result = {
        "controllability": controllability,
        "pairs": pairs,
        "untargeted": untargeted,
        "targeted_max": targeted_max,
        "num_prompts": sum(len(g) for g in groups),
        "prompts_per_target": prompts_per_target,
        "seed": seed,
        "dims": list(names),
        "raw_ranges": {d.name: [float(d.raw_range[0]), float(d.raw_range[1])] for d in spec.dimensions},
    }
    if targeted_prompts is not None:
        result["random_targets"] = _random_target_errors(spec, rt_base, rt_levels, responses[-1])
    return result


def _sweep_summary(spec: PreferenceSpec, sweep: list, scores: list[np.ndarray]) -> dict:
    """Figure 5: per dimension, achieved raw score (all dims) vs the prefix level of that dimension."""
    names = spec.names
    out: dict[str, dict] = {}
    for (name, cls, _), s_NH in zip(sweep, scores):
        entry = out.setdefault(
            name, {"targets": [], "achieved": [], "all_dims": {n: [] for n in names}, "_x": [], "_y": []}
        )
        h = spec.index(name)
        level = spec[name].first_level + cls
        entry["targets"].append(level)
        entry["achieved"].append(float(s_NH[:, h].mean()))
        for j, n in enumerate(names):
            entry["all_dims"][n].append(float(s_NH[:, j].mean()))
        entry["_x"] += [level] * len(s_NH)
        entry["_y"] += s_NH[:, h].tolist()
    for entry in out.values():
        entry["spearman"] = spearman(entry.pop("_x"), entry.pop("_y"))
        entry["spearman_means"] = spearman(entry["targets"], entry["achieved"])
    return out


def _parse_records(records: list[dict], spec: PreferenceSpec) -> tuple[list[str], list[dict[str, int]]]:
    """(base prompt, target levels) per policy_eval record; the prefix and ``targets`` must agree."""
    if not records:
        raise EvalError("targeted_prompts is empty")
    bases, levels = [], []
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise EvalError(f"targeted_prompts[{i}] needs a string field 'prompt'")
        classes, base = parse_prefix(rec["prompt"], spec)
        from_prefix = {n: spec[n].first_level + c for n, c in classes.items()}
        if "targets" in rec:
            given = {spec.canonical(k): v for k, v in rec["targets"].items()}
            if given != from_prefix:
                raise EvalError(f"targeted_prompts[{i}]: targets {rec['targets']} disagree with prefix {from_prefix}")
        bases.append(base)
        levels.append(from_prefix)
    return bases, levels


def _random_target_errors(spec, bases, target_levels, responses) -> dict:
    """|oracle level − target level| per named dimension, in the spec's level space."""
    err: dict[str, list[int]] = {n: [] for n in spec.names}
    for base, targets, resp in zip(bases, target_levels, responses):
        got = oracle.levels(base, resp, spec)
        for n, level in targets.items():
            err[n].append(abs(got[n] - level))
    named = {n: e for n, e in err.items() if e}
    mae = {n: float(np.mean(e)) for n, e in named.items()}
    return {
        "mae": mae,
        "mae_mean": float(np.mean(list(mae.values()))) if mae else math.nan,  # mean over dims
        "exact": {n: float(np.mean(np.asarray(e) == 0)) for n, e in named.items()},
        "count": {n: len(e) for n, e in named.items()},
        "num_records": len(bases),
    }


# ---- SFT vs MOSLIM ------------------------------------------------------------------------------
def _max_scores(result: dict) -> dict[str, float]:
    return result["targeted_max"] if "targeted_max" in result else result


def _normalise(value: float, lo: float, hi: float) -> float:
    return (value - lo) / (hi - lo) if hi > lo else math.nan


def compare_to_reference(moslim: dict, sft: dict) -> dict:
    """Table 2 summary: targeted-max score of each dim for both policies, Δ, and means over dims.

    Accepts full :func:`evaluate_policy` results or bare ``{dim: targeted-max score}`` dicts.
    ``named_mean`` averages raw scores (mixed scales, like the paper's table);
    ``named_mean_normalised`` first maps each dim to [0, 1] by its raw range.
    """
    m, s = _max_scores(moslim), _max_scores(sft)
    missing = [d for d in m if d not in s]
    if missing:
        raise EvalError(f"the reference (SFT) result has no dimension {missing[0]!r}")
    ranges = {**{k: tuple(v) for k, v in oracle.ORACLE_SCALES.items()}, **moslim.get("raw_ranges", {})}
    dims = {d: {"sft": float(s[d]), "moslim": float(m[d]), "delta": float(m[d]) - float(s[d])} for d in m}
    mean = lambda vals: float(np.mean(vals)) if vals else math.nan  # noqa: E731
    out = {
        "dims": dims,
        "named_mean": {k: mean([v[k] for v in dims.values()]) for k in ("sft", "moslim", "delta")},
        "named_mean_normalised": {
            k: mean([_normalise(v[k], *ranges[d]) for d, v in dims.items() if d in ranges]) for k in ("sft", "moslim")
        },
    }
    if "controllability" in moslim and "controllability" in sft:
        out["spearman"] = {
            d: {"sft": sft["controllability"][d]["spearman"], "moslim": moslim["controllability"][d]["spearman"]}
            for d in m
            if d in moslim["controllability"] and d in sft["controllability"]
        }
    if "random_targets" in moslim and "random_targets" in sft:
        out["mae_mean"] = {"sft": sft["random_targets"]["mae_mean"], "moslim": moslim["random_targets"]["mae_mean"]}
    return out
