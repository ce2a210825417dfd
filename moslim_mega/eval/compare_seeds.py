"""Multi-seed ``moslim compare``: mean ± std over seeds of every quantity the single-seed table
reports, and which method wins where.

One training seed can flip a close ranking (docs/compare.md compares seed 0 and seed 1 by hand).
``moslim compare --seeds 0-2`` runs the whole comparison once per ``run.seed`` into
``<out>/seed_<n>/`` — the world stays the recipe's (``world.seed``), so only the training and
sampling seeds vary, as in ``moslim demo --seeds`` — and writes ``seeds.json`` and ``seeds.md``
from the per-seed report.json files (built by :func:`moslim_mega.compare.build_report`):

* per method (and the SFT start) and quantity — Table 2's oracle score of each dimension asked for
  alone at max, the normalised mean, the random-target MAE, Spearman ρ per dimension, the pair
  scores, the training seconds — the mean and sample std over seeds and the per-seed values;
* per quantity, the method with the best mean and how many seeds each method won. The SFT start
  is shown but never a contender (as in the single-seed ``winners``); ties follow
  :func:`moslim_mega.compare.best_methods`, so a tie is a win for every tied method.

Everything but :func:`write_compare_seeds` is a pure function of the list of report dicts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..compare import best_methods
from .compare_report import LABELS
from .report import _fmt, report_to_jsonable
from .seeds import SeedsError

# Section titles of seeds.md, in the single-seed report.md's order.
GROUPS = {
    "table2": "Table 2 analogue: each dimension asked for alone at max (+ random-target MAE, training seconds)",
    "rho": "Figure 5 analogue: Spearman ρ(target level, achieved score)",
    "pairs": "Figure 6 analogue: pairs at max (mean normalised score of the two named dimensions)",
}


@dataclass(frozen=True)
class Quantity:
    """One number per (report, method): ``report[section][method]`` or ``report[section][method][field]``."""

    key: str  # seeds.json key, e.g. "table2.helpfulness"
    label: str  # its name in the wins / per-seed tables
    column: str  # its column header in its group's mean ± std table
    group: str  # a key of GROUPS
    section: str  # the report.json field it is read from
    field: str | None  # the sub-field under report[section][method]; None: that value itself
    higher_is_better: bool
    digits: int

    def value(self, report: dict, method: str) -> float:
        try:
            v = report[self.section][method]
            if self.field is not None:
                v = v[self.field]
        except KeyError:
            where = f"{self.section}[{method!r}]" + (f"[{self.field!r}]" if self.field is not None else "")
            raise SeedsError(f"seed {report.get('seed')}: report.json has no {where}") from None
        # report.json stores NaN (e.g. ρ of a constant response) as null.
        return math.nan if v is None else float(v)


def report_rows(report: dict) -> list[str]:
    """The SFT start (when the report has it) and the compared methods, in report order."""
    methods = list(report["methods"])
    return (["sft"] if "sft" in report["table2"] else []) + methods


def _pair_keys(report: dict) -> list[str]:
    scores = report.get("pair_score") or {}
    first = next(iter(scores.values()), {})
    return list(first)


def quantities(report: dict) -> list[Quantity]:
    """What the single-seed table reports (compare_report.format_table/_md), in that order."""
    dims = list(report["dims"])
    qs = [Quantity(f"table2.{d}", f"{d} at max", d, "table2", "table2", d, True, 2) for d in dims]
    qs += [Quantity("table2.mean_normalised", "mean (normalised)", "mean (normalised)", "table2", "table2",
                    "mean_normalised", True, 3),
           Quantity("random_target_mae", "random-target MAE", "random-target MAE", "table2", "random_target_mae",
                    None, False, 2),
           Quantity("train_seconds", "train s (incl. shared)", "train s (incl. shared)", "table2", "compute",
                    "train_seconds_incl_shared", False, 0)]
    qs += [Quantity(f"spearman.{d}", f"ρ {d}", d, "rho", "spearman", d, True, 2) for d in dims]
    qs += [Quantity(f"pair_score.{k}", f"pair {k}", k, "pairs", "pair_score", k, True, 3) for k in _pair_keys(report)]
    return qs


def _layout(report: dict) -> dict:
    return {"methods": list(report["methods"]), "dims": list(report["dims"]), "rows": report_rows(report),
            "pairs": _pair_keys(report)}


def check_same_comparison(reports: list[dict]) -> None:
    """Every seed must have compared the same methods on the same dimensions and pairs; averaging
    over different comparisons would silently mix them."""
    if not reports:
        raise SeedsError("no per-seed report to summarise")
    first = _layout(reports[0])
    seeds = [r.get("seed") for r in reports]
    dup = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
    if dup:
        raise SeedsError(f"seed {dup[0]} appears twice among the reports")
    for r in reports[1:]:
        for name, value in _layout(r).items():
            if value != first[name]:
                raise SeedsError(f"seed {r.get('seed')}: its {name} {value} differ from seed "
                                 f"{reports[0].get('seed')}'s {first[name]}; every seed must run the same comparison")


def mean_std(values) -> dict:
    """Mean and sample std (ddof=1) of the finite values; std 0.0 for one value (as eval/seeds.py)."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
            "n": len(vals)}


def winners(scores: dict[str, float], higher_is_better: bool) -> list[str]:
    """The best methods among those with a finite score (none if none has one); ties as best_methods."""
    finite = {m: (v if higher_is_better else -v) for m, v in scores.items() if math.isfinite(v)}
    return best_methods(finite) if finite else []


def summarise(reports: list[dict]) -> dict:
    """The seeds.json content (before NaN → null): per quantity, per row mean/std/values, best mean, wins."""
    check_same_comparison(reports)
    layout = _layout(reports[0])
    methods, rows = layout["methods"], layout["rows"]
    out = {"seeds": [r["seed"] for r in reports], "num_seeds": len(reports), **layout, "quantities": {}}
    for q in quantities(reports[0]):
        values = {m: [q.value(r, m) for r in reports] for m in rows}
        stats = {m: {**mean_std(values[m]), "values": values[m]} for m in rows}
        per_seed = [winners({m: values[m][i] for m in methods}, q.higher_is_better) for i in range(len(reports))]
        out["quantities"][q.key] = {
            "label": q.label, "better": "higher" if q.higher_is_better else "lower",
            "stats": stats,
            "best_mean": winners({m: stats[m]["mean"] for m in methods}, q.higher_is_better),
            "seed_winners": per_seed,
            "seed_wins": {m: sum(m in w for w in per_seed) for m in methods},
        }
    return out


def _label(m: str) -> str:
    return LABELS.get(m, m)


def _mean_cell(st: dict, digits: int, num_seeds: int) -> str:
    if st["n"] == 0:
        return "–"
    cell = f"{st['mean']:.{digits}f} ± {st['std']:.{digits}f}"
    # A mean over fewer seeds (ρ is undefined when a policy's scores are constant) says so.
    return cell + (f" (n={st['n']})" if st["n"] < num_seeds else "")


def render_markdown(summary: dict, reports: list[dict]) -> str:
    qs = quantities(reports[0])
    n, rows, methods, seeds = summary["num_seeds"], summary["rows"], summary["methods"], summary["seeds"]
    Q = summary["quantities"]
    L = [f"# moslim compare over {n} seeds — {', '.join(_label(m) for m in methods)}", "",
         f"Seeds (`run.seed`): {', '.join(map(str, seeds))}. The world is the recipe's (`world.seed`) for every "
         "seed, so only the training and sampling seeds vary. Scores are the oracle's raw ratings on held-out "
         "prompts (never a reward model). Cells: mean ± sample std over seeds (n = seeds with a defined value "
         "when fewer); per-seed values and reports below and in `seed_<n>/report.md`."]
    for group, title in GROUPS.items():
        gq = [q for q in qs if q.group == group]
        if not gq:
            continue
        L += ["", f"## {title}", "", "| method | " + " | ".join(q.column for q in gq) + " |",
              "|---|" + "---|" * len(gq)]
        for m in rows:
            L.append(f"| {_label(m)} | " + " | ".join(_mean_cell(Q[q.key]["stats"][m], q.digits, n) for q in gq) + " |")
    L += ["", "## Which method wins where", "",
          "Best mean: the method(s) with the best mean over seeds. Seeds won: on how many seeds each method "
          "was the best; a tie (within 1e-9) is a win for every tied method, so wins can add up to more than "
          f"{n}. The SFT start is not a contender. Lower is better for the MAE and the training seconds, "
          "higher for the rest.", "",
          "| quantity | better | best mean | seeds won |", "|---|---|---|---|"]
    for q in qs:
        e = Q[q.key]
        best = f"**{' = '.join(_label(m) for m in e['best_mean'])}**" if e["best_mean"] else "–"
        won = ", ".join(f"{_label(m)} {e['seed_wins'][m]}/{n}" for m in methods)
        L.append(f"| {q.label} | {e['better']} | {best} | {won} |")
    L += ["", "## Per seed", "", "The seed's winner(s) in bold.", "",
          "| quantity | method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
          "|---|---|" + "---|" * len(seeds)]
    for q in qs:
        e = Q[q.key]
        for m in rows:
            cells = [_fmt(v, digits=q.digits) for v in e["stats"][m]["values"]]
            cells = [f"**{c}**" if m in w else c for c, w in zip(cells, e["seed_winners"])]
            L.append(f"| {q.label} | {_label(m)} | " + " | ".join(cells) + " |")
    L.append("")
    return "\n".join(L)


def write_compare_seeds(out_dir, reports: list[dict]) -> dict:
    """seeds.json + seeds.md in ``out_dir``; returns the summary (NaN as in memory, null in the file)."""
    summary = summarise(reports)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(report_to_jsonable(summary), indent=2))
    (out / "seeds.md").write_text(render_markdown(summary, reports))
    return summary
