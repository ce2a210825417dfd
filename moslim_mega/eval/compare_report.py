"""The ``moslim compare`` report: report.json, report.md and PNGs — analogues of the paper's
Table 2 (oracle score of each dimension asked for alone at max, per method), Figure 5
(controllability of intensity), Figure 6 (pairs at max, radar) and Table 8 (compute).

The report dict is built by :func:`moslim_mega.compare.build_report`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .report import _figure, _fmt, report_to_jsonable, style_level_axis

COLORS = {"sft": "tab:gray", "moslim": "tab:red", "morlhf": "tab:blue", "rsoup": "tab:green", "dpa": "tab:purple"}
LABELS = {"sft": "SFT", "moslim": "MOSLIM", "morlhf": "MORLHF", "rsoup": "RSoup", "dpa": "DPA"}


def _rows(report: dict) -> list[str]:
    return ["sft", *report["methods"]]


def format_table(report: dict) -> str:
    """Table 2 analogue as text: each dimension asked for alone at max, oracle raw scores."""
    dims = report["dims"]
    lines = [f"{'method':8s} " + " ".join(f"{d:>13s}" for d in dims) + f" {'mean(norm)':>11s} {'train s':>8s}"]
    for m in _rows(report):
        t = report["table2"][m]
        lines.append(f"{LABELS[m]:8s} " + " ".join(f"{_fmt(t[d], digits=2):>13s}" for d in dims)
                     + f" {_fmt(t['mean_normalised'], digits=3):>11s}"
                     + f" {report['compute'][m]['train_seconds_incl_shared']:>8.0f}")
    return "\n".join(lines)


def _md(report: dict) -> str:
    dims, rows = report["dims"], _rows(report)
    L = [f"# moslim compare — {', '.join(LABELS[m] for m in report['methods'])}", "",
         f"Embedded world, seed {report['seed']}, policy algorithm `{report['policy_algo']}` "
         f"({report['policy_steps']} steps per trained policy), wall {report['wall_seconds']:.0f} s. "
         "Scores are the oracle's raw ratings on held-out prompts (never a reward model).", "",
         *([f"**Stopped by the max_minutes safety net: {', '.join(report['stopped_by_max_minutes'])}** — those "
            "stages ran fewer steps than the recipe; the comparison is not the recipe's.", ""]
           if report.get("stopped_by_max_minutes") else []),
         "## Table 2 analogue: each dimension asked for alone at max", "",
         "| method | " + " | ".join(dims) + " | mean (normalised) | random-target MAE |",
         "|---|" + "---|" * (len(dims) + 2)]
    for m in rows:
        t = report["table2"][m]
        L.append(f"| {LABELS[m]} | " + " | ".join(_fmt(t[d], digits=2) for d in dims)
                 + f" | {_fmt(t['mean_normalised'])} | {_fmt(report['random_target_mae'][m], digits=2)} |")
    L += ["", "Winners: " + "; ".join(f"{k}: **{' = '.join(LABELS[m] for m in v)}**" for k, v in report["winners"].items()), "",
          "## Figure 5 analogue: Spearman ρ(target level, achieved score)", "",
          "Only MOSLIM reads an intensity; the baselines get the same prompts and drop the level, so "
          "their ρ measures noise.", "",
          "| method | " + " | ".join(dims) + " |", "|---|" + "---|" * len(dims)]
    for m in rows:
        L.append(f"| {LABELS[m]} | " + " | ".join(_fmt(report["spearman"][m][d], digits=2) for d in dims) + " |")
    pairs = list(report["pair_score"][rows[0]])
    L += ["", "## Figure 6 analogue: pairs at max (mean normalised score of the two named dimensions)", "",
          "| method | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
    for m in rows:
        L.append(f"| {LABELS[m]} | " + " | ".join(_fmt(report["pair_score"][m][k]) for k in pairs) + " |")
    if report.get("rsoup_sweep"):
        L += ["", "## Rewarded Soups λ sweep (Eq. 2)", "", "| pair | λ | " + " | ".join(dims) + " |",
              "|---|---|" + "---|" * len(dims)]
        for k, pts in report["rsoup_sweep"].items():
            for p in pts:
                lam = ", ".join(f"{x:.2f}" for x in p["lambda"])
                L.append(f"| {k} | ({lam}) | " + " | ".join(_fmt(p["scores"][d], digits=2) for d in dims) + " |")
    L += ["", "## Table 8 analogue: compute (wall-clock × devices; 1 device = the whole CPU)", "",
          "Shared stages (every method): " + ", ".join(f"{k} {v:.0f} s" for k, v in report["shared_stages"].items()),
          "", "| method | training stages (s) | train total incl. shared (s) | device-hours | eval (s) |",
          "|---|---|---|---|---|"]
    for m in rows:
        c = report["compute"][m]
        st = ", ".join(f"{k} {v:.0f}" for k, v in c["stages"].items()) or "–"
        L.append(f"| {LABELS[m]} | {st} | {c['train_seconds_incl_shared']:.0f} | {c['device_hours']:.3f} | "
                 f"{c['eval_seconds']:.0f} |")
    L += ["", "## Figures", "", "![table2](table2.png)", "", "![controllability](controllability.png)", "",
          "![pairs](pairs_radar.png)", ""]
    if report.get("rsoup_sweep"):
        L += ["![fronts](pair_fronts.png)", ""]
    return "\n".join(L)


def _norm(v, lo, hi) -> float:
    return (v - lo) / (hi - lo) if v is not None and hi > lo else math.nan


def plot_table2(report: dict, path: Path) -> None:
    dims, rows, rng = report["dims"], _rows(report), report["raw_ranges"]
    fig, (ax,) = _figure(1, 1, (max(6.0, 2.0 * len(dims)), 3.8))
    width = 0.8 / len(rows)
    for i, m in enumerate(rows):
        vals = [_norm(report["table2"][m][d], *rng[d]) for d in dims]
        ax.bar(np.arange(len(dims)) + (i - (len(rows) - 1) / 2) * width, np.nan_to_num(vals), width,
               color=COLORS[m], label=LABELS[m])
    ax.set_xticks(np.arange(len(dims)))
    ax.set_xticklabels(dims)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("normalised oracle score")
    ax.set_title("Each dimension asked for alone at max")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


def plot_controllability(report: dict, path: Path) -> None:
    dims, rows, rng = report["dims"], _rows(report), report["raw_ranges"]
    fig, axes = _figure(len(dims), 3, (4.2, 3.4))
    for ax, d in zip(axes, dims):
        for m in rows:
            c = report["controllability"][m][d]
            ax.plot(c["targets"], c["achieved"], "o-" if m == "moslim" else ".--", color=COLORS[m],
                    label=f"{LABELS[m]} ρ={_fmt(c.get('spearman'), digits=2)}")
        style_level_axis(ax, d, *rng[d], legend_size=7)
    fig.suptitle("Controllability of intensity (oracle)")
    fig.savefig(path, dpi=100)


def plot_pairs_radar(report: dict, path: Path) -> None:
    dims, rows, rng = report["dims"], _rows(report), report["raw_ranges"]
    keys = list(report["pairs"][rows[0]])
    fig, axes = _figure(max(1, len(keys)), 4, (3.4, 3.4), polar=True)
    angles = np.linspace(0.0, 2 * math.pi, len(dims), endpoint=False)
    closed = np.concatenate((angles, angles[:1]))
    for ax, key in zip(axes, keys):
        for m in rows:
            vals = [_norm(report["pairs"][m][key][d], *rng[d]) for d in dims]
            vals = np.nan_to_num(np.asarray(vals + vals[:1]))
            ax.plot(closed, vals, "o-", color=COLORS[m], label=LABELS[m], linewidth=1.2, markersize=3)
            ax.fill(closed, vals, color=COLORS[m], alpha=0.08)
        ax.set_xticks(angles)
        ax.set_xticklabels(dims, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_yticklabels([])
        ax.set_title(key.replace("+", " + ") + " at max", fontsize=9)
    if keys:
        axes[0].legend(loc="lower left", bbox_to_anchor=(-0.3, -0.3), fontsize=7)
    fig.suptitle("Pairs at max targets (normalised oracle scores)")
    fig.savefig(path, dpi=100)


def plot_pair_fronts(report: dict, path: Path) -> None:
    """Per pair (a, b): the Rewarded Soups λ curve and each method's points for <a max>, <b max>
    and <a max><b max> in the (a, b) score plane."""
    sweep, rows = report["rsoup_sweep"], _rows(report)
    fig, axes = _figure(len(sweep), 3, (4.0, 3.6))
    for ax, (key, pts) in zip(axes, sweep.items()):
        a, b = key.split("+")
        ax.plot([p["scores"][a] for p in pts], [p["scores"][b] for p in pts], "-", color=COLORS["rsoup"],
                alpha=0.6, label="RSoup λ sweep")
        for m in rows:
            c = report["controllability"][m]
            xs = [c[a]["all_dims"][a][-1], c[b]["all_dims"][a][-1], report["pairs"][m][key][a]]
            ys = [c[a]["all_dims"][b][-1], c[b]["all_dims"][b][-1], report["pairs"][m][key][b]]
            ax.scatter(xs, ys, color=COLORS[m], marker="o", s=18, label=LABELS[m])
        ax.set_xlabel(a)
        ax.set_ylabel(b)
        ax.grid(alpha=0.3)
        ax.set_title(key.replace("+", " vs "), fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("Trade-offs: <a max>, <b max>, <a max><b max> per method")
    fig.savefig(path, dpi=100)


def write_compare_report(out_dir, report: dict) -> dict[str, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "table2": out / "table2.png",
             "controllability": out / "controllability.png", "pairs_radar": out / "pairs_radar.png"}
    paths["json"].write_text(json.dumps(report_to_jsonable(report), indent=2))
    paths["md"].write_text(_md(report))
    plot_table2(report, paths["table2"])
    plot_controllability(report, paths["controllability"])
    plot_pairs_radar(report, paths["pairs_radar"])
    if report.get("rsoup_sweep"):
        paths["fronts"] = out / "pair_fronts.png"
        plot_pair_fronts(report, paths["fronts"])
    return paths
