"""Write an evaluation report: report.json, report.md and PNG figures (Figures 5-6, Table 2 analogues).

The report dict (built by the pipeline) holds, at least::

    {"algo": str, "seed": int, "wall_seconds": float,
     "controllability": {dim: {"targets", "achieved", "spearman", ...}},   # MOSLIM policy
     "pairs": {"a+b": {dim: raw score}},                                  # MOSLIM policy
     "sft": {dim: targeted-max score}, "moslim": {dim: targeted-max score}}

and optionally ``untargeted``, ``sft_eval`` / ``moslim_eval`` (full ``evaluate_policy`` results),
``stages`` ({stage: seconds}) and ``spec`` (``PreferenceSpec.to_dict()``, for raw ranges).
Figures are drawn with matplotlib's object API on the Agg canvas, so no global backend is touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path

import numpy as np

from ..world import oracle

__all__ = ["write_report", "format_summary", "report_to_jsonable", "REQUIRED_KEYS"]

REQUIRED_KEYS = ("algo", "seed", "wall_seconds", "controllability", "pairs", "sft", "moslim")


class ReportError(ValueError):
    """A report dict missing a required key or holding a value JSON cannot store."""


# ---- JSON ---------------------------------------------------------------------------------------
def report_to_jsonable(obj, path: str = "report"):
    """A deep copy using only JSON types; NaN/±inf become None (``null``)."""
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, dict):
        return {str(k): report_to_jsonable(v, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        obj = obj.tolist()
    if isinstance(obj, (list, tuple)):
        return [report_to_jsonable(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return report_to_jsonable(dataclasses.asdict(obj), path)
    raise ReportError(f"{path}: cannot store a {type(obj).__name__} in report.json")


# ---- helpers --------------------------------------------------------------------------------------
def _dims(report: dict) -> list[str]:
    return list(report.get("moslim") or report["controllability"])


def _num(x) -> float:
    return math.nan if x is None else float(x)


def _fmt(x, signed: bool = False, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _sub(report: dict, policy: str, key: str):
    """A policy's evaluation field; for MOSLIM the top-level copy wins over ``moslim_eval``."""
    if policy == "moslim" and key in report:
        return report[key]
    return (report.get(f"{policy}_eval") or {}).get(key)


def _raw_ranges(report: dict) -> dict[str, tuple[float, float]]:
    """Raw rating range per dim: spec first, then the evaluation's, then the oracle's scales."""
    ranges = {k: (float(lo), float(hi)) for k, (lo, hi) in oracle.ORACLE_SCALES.items()}
    for ev in (report.get("sft_eval"), report.get("moslim_eval")):
        for k, v in ((ev or {}).get("raw_ranges") or {}).items():
            ranges[k] = (float(v[0]), float(v[1]))
    for d in (report.get("spec") or {}).get("dimensions", []):
        if "raw_range" in d:
            ranges[d["name"]] = (float(d["raw_range"][0]), float(d["raw_range"][1]))
    for d in _dims(report):  # unknown dims: 0 .. the largest score seen
        if d not in ranges:
            ranges[d] = (0.0, max(1.0, _num(report["moslim"].get(d)), _num(report["sft"].get(d))))
    return ranges


def _norm(value, lo: float, hi: float) -> float:
    return (_num(value) - lo) / (hi - lo) if hi > lo else math.nan


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


# ---- markdown --------------------------------------------------------------------------------------
def _md_headline(report: dict, dims: list[str]) -> list[str]:
    rows = []
    for d in dims:
        s, m = _num(report["sft"].get(d)), _num(report["moslim"].get(d))
        rows.append([d, _fmt(s), _fmt(m), _fmt(m - s, signed=True)])
    s_mean = float(np.mean([_num(report["sft"].get(d)) for d in dims]))
    m_mean = float(np.mean([_num(report["moslim"].get(d)) for d in dims]))
    rows.append(["**mean**", _fmt(s_mean), _fmt(m_mean), _fmt(m_mean - s_mean, signed=True)])
    return ["## Scores at max targets (Table 2 analogue)", "",
            "Raw oracle score of a dimension when the prompt asks for it alone at its max level.", "",
            *_table(["dimension", "SFT", "MOSLIM", "Δ"], rows), ""]


def _md_controllability(report: dict, dims: list[str]) -> list[str]:
    lines = ["## Controllability of intensity (Figure 5 analogue)", "",
             "Mean raw oracle score of the dimension when its prefix level is swept; Spearman ρ is over "
             "individual samples (target level vs score); ρ(means) over the per-level means.", ""]
    mos, sft = _sub(report, "moslim", "controllability") or {}, _sub(report, "sft", "controllability") or {}
    for d in dims:
        m, s = mos.get(d), sft.get(d)
        if m is None:
            continue
        lines.append(f"### {d}")
        lines.append("")
        s_ach = s["achieved"] if s else [None] * len(m["targets"])
        rows = [[str(t), _fmt(a), _fmt(b)] for t, a, b in zip(m["targets"], m["achieved"], s_ach)]
        rows.append(["Spearman ρ", _fmt(m.get("spearman")), _fmt(s.get("spearman") if s else None)])
        rows.append(["ρ (means)", _fmt(m.get("spearman_means")), _fmt(s.get("spearman_means") if s else None)])
        lines += _table(["target level", "MOSLIM", "SFT"], rows) + [""]
    return lines


def _md_pairs(report: dict, dims: list[str]) -> list[str]:
    mos, sft = report.get("pairs") or {}, _sub(report, "sft", "pairs") or {}
    if not mos:
        return []
    rows = []
    for key, scores in mos.items():
        ref = sft.get(key, {})
        rows.append([key] + [f"{_fmt(scores.get(d))} ({_fmt(ref.get(d))})" for d in dims])
    return ["## Pairs of dimensions at max targets (Figure 6 analogue)", "",
            "Raw oracle score of every dimension when both named dimensions are asked for at max: "
            "MOSLIM (SFT).", "", *_table(["pair"] + dims, rows), ""]


def _md_untargeted(report: dict, dims: list[str]) -> list[str]:
    mu = _sub(report, "moslim", "untargeted") or {}
    su = _sub(report, "sft", "untargeted") or {}
    if not mu and not su:
        return []
    rows = [[d, _fmt(su.get(d)), _fmt(report["sft"].get(d)), _fmt(mu.get(d)), _fmt(report["moslim"].get(d))]
            for d in dims]
    return ["## Untargeted vs targeted", "",
            "No prefix vs the dimension alone at max.", "",
            *_table(["dimension", "SFT untargeted", "SFT max", "MOSLIM untargeted", "MOSLIM max"], rows), ""]


def _md_random_targets(report: dict, dims: list[str]) -> list[str]:
    mr, sr = _sub(report, "moslim", "random_targets"), _sub(report, "sft", "random_targets")
    if not mr and not sr:
        return []
    mr, sr = mr or {}, sr or {}
    get = lambda r, k, d: (r.get(k) or {}).get(d)  # noqa: E731
    rows = [[d, _fmt(get(sr, "mae", d)), _fmt(get(mr, "mae", d)), _fmt(get(sr, "exact", d)),
             _fmt(get(mr, "exact", d))] for d in dims]
    rows.append(["**mean**", _fmt(sr.get("mae_mean")), _fmt(mr.get("mae_mean")), "", ""])
    return ["## Random multi-dimension targets (policy_eval)", "",
            "Mean |oracle level − target level| per named dimension, in the spec's level space, and the "
            "fraction hit exactly.", "",
            *_table(["dimension", "SFT MAE", "MOSLIM MAE", "SFT exact", "MOSLIM exact"], rows), ""]


def _md_stages(report: dict) -> list[str]:
    stages = report.get("stages") or {}
    if not stages:
        return []
    rows = [[k, _fmt(_num(v), digits=1)] for k, v in stages.items()]
    return ["## Stage timings", "", *_table(["stage", "seconds"], rows), ""]


def render_markdown(report: dict) -> str:
    dims = _dims(report)
    lines = [f"# MOSLIM evaluation report — {report['algo']}", "",
             f"- algorithm: `{report['algo']}`", f"- seed: {report['seed']}",
             f"- wall time: {_fmt(_num(report['wall_seconds']), digits=1)} s",
             f"- dimensions: {', '.join(dims)}",
             "- scores: the world's oracle on its raw rating scale (never the reward model)", ""]
    for part in (_md_headline, _md_controllability, _md_pairs, _md_untargeted, _md_random_targets):
        lines += part(report, dims)
    lines += _md_overopt(report)
    lines += _md_stages(report)
    lines += ["## Figures", "", "![controllability](controllability.png)", "",
              "![pairs](pairs_radar.png)", "", "![scores](scores.png)", ""]
    if (report.get("overoptimisation") or {}).get("curve"):
        lines += ["![reward vs KL](overopt.png)", ""]
    return "\n".join(lines)


def _md_overopt(report: dict) -> list[str]:
    """Reward over-optimisation measured on the policy's own samples (issue 18)."""
    o = report.get("overoptimisation") or {}
    lines = []
    if "oracle_peak_step" in o:
        verdict = (f"**detected** ({', '.join(o.get('signals') or [])}"
                   + (f": {', '.join(o['agreement_fell'])}" if o.get("agreement_fell") else "") + ")"
                   if o.get("detected") else "not detected")
        lines += ["## Reward over-optimisation (on-policy, RM vs oracle)", "",
                  "Every policy step scores its rollouts with the RM (Eq. 11) and with the oracle fed through "
                  "the same mapping (one-hot on the oracle's class); agreement = Spearman of the RM's term vs the "
                  "oracle's closeness to the target, per named dimension.", "",
                  f"- over-optimisation: {verdict} (drop from peak {_fmt(o.get('oracle_drop_from_peak'))}, "
                  f"threshold {_fmt(o.get('drop_threshold'))})",
                  f"- oracle reward peaked at step {o['oracle_peak_step']} ({_fmt(o.get('oracle_peak'))}, KL "
                  f"{_fmt(o.get('kl_at_peak'))}); at the end {_fmt(o.get('oracle_final'))} (KL {_fmt(o.get('kl_final'))})",
                  f"- RM reward at the oracle's peak {_fmt(o.get('rm_reward_at_peak'))}, at the end "
                  f"{_fmt(o.get('rm_reward_final'))}; RM−oracle gap {_fmt(o.get('rm_oracle_gap_first'))} → "
                  f"{_fmt(o.get('rm_oracle_gap_final'))}",
                  f"- RM–oracle agreement: first {_fmt(o.get('agree_first'))}, last {_fmt(o.get('agree_final'))}; "
                  "per dimension at the end: " + ", ".join(
                      f"{k[len('agree_'):-len('_final')]} {_fmt(v)}" for k, v in o.items()
                      if k.startswith("agree_") and k.endswith("_final") and k != "agree_final"), ""]
    rm = report.get("rm_eval") or {}
    if rm.get("in_distribution") and rm.get("ood"):
        keys = ("intensity_accuracy", "pairwise_accuracy", "mapping_accuracy")
        lines += ["## Reward model: held-out vs out-of-distribution slice", "",
                  *_table(["slice", *keys], [[name, *(_fmt(rm[name].get(k)) for k in keys)]
                                             for name in ("in_distribution", "ood")]), ""]
    capped = report.get("stopped_by_max_minutes")
    if capped:
        lines += [f"**Stopped by the max_minutes safety net: {', '.join(capped)}** — those stages ran fewer steps "
                  f"than the recipe ({report.get('steps')}); the result is not the recipe's.", ""]
    return lines


def plot_overopt(report: dict, path: Path) -> None:
    """Gao et al.'s picture: RM (proxy) and oracle (gold) reward against KL from the reference."""
    o = report["overoptimisation"]
    c = o["curve"]
    fig, (ax,) = _figure(1, 1, (5.5, 3.6))
    ax.plot(c["kl"], c["rm_reward"], label="RM mapped reward (proxy)")
    ax.plot(c["kl"], c["oracle_reward"], label="oracle mapped reward (gold)")
    verdict = "over-optimisation detected" if o.get("detected") else "no over-optimisation detected"
    ax.axvline(o["kl_at_peak"], color="grey", ls=":", lw=1, label=f"oracle peak (step {o['oracle_peak_step']})")
    ax.set_title(f"50-step means; {verdict}", fontsize=8)
    ax.set_xlabel("KL(π ‖ π_SFT), nats per sequence")
    ax.set_ylabel("mapped reward (Eq. 11)")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


# ---- figures ---------------------------------------------------------------------------------------
def _figure(n_panels: int, ncols_max: int, panel_size: tuple[float, float], polar: bool = False):
    from matplotlib.figure import Figure  # the object API renders on Agg without pyplot's globals

    ncols = max(1, min(n_panels, ncols_max))
    nrows = max(1, math.ceil(n_panels / ncols))
    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    axes = [fig.add_subplot(nrows, ncols, i + 1, projection="polar" if polar else None) for i in range(n_panels)]
    return fig, axes


def plot_controllability(report: dict, path: Path) -> None:
    dims, ranges = _dims(report), _raw_ranges(report)
    mos, sft = report["controllability"], _sub(report, "sft", "controllability") or {}
    fig, axes = _figure(len(dims), 3, (4.2, 3.4))
    for ax, d in zip(axes, dims):
        lo, hi = ranges[d]
        if d in mos:
            m = mos[d]
            label = f"MOSLIM ρ={_fmt(m.get('spearman'), digits=2)}"
            ax.plot(m["targets"], m["achieved"], "o-", color="tab:red", label=label)
            if list(m["targets"]) == list(range(int(lo), int(hi) + 1)):  # levels are the raw scale
                ax.plot(m["targets"], m["targets"], ":", color="grey", label="target")
            ax.set_xticks(m["targets"])
        if d in sft:
            s = sft[d]
            label = f"SFT ρ={_fmt(s.get('spearman'), digits=2)}"
            ax.plot(s["targets"], s["achieved"], "s--", color="tab:blue", label=label)
        style_level_axis(ax, d, lo, hi, legend_size=8)
    fig.suptitle("Controllability of intensity (oracle scores)")
    fig.savefig(path, dpi=100)


def style_level_axis(ax, dim: str, lo: float, hi: float, legend_size: int) -> None:
    """Axes of one controllability panel: target level → achieved raw oracle score."""
    pad = 0.05 * (hi - lo)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_title(dim)
    ax.set_xlabel(f"target level <{dim} n>")
    ax.set_ylabel("achieved raw score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def plot_pairs_radar(report: dict, path: Path) -> None:
    dims, ranges = _dims(report), _raw_ranges(report)
    mos, sft = report.get("pairs") or {}, _sub(report, "sft", "pairs") or {}
    keys = list(mos)
    fig, axes = _figure(max(1, len(keys)), 4, (3.4, 3.4), polar=True)
    if not keys:
        axes[0].set_axis_off()
        axes[0].text(0.5, 0.5, "no pairs (one dimension)", ha="center", va="center", transform=axes[0].transAxes)
    angles = np.linspace(0.0, 2 * math.pi, len(dims), endpoint=False)
    closed = np.concatenate((angles, angles[:1]))
    for ax, key in zip(axes, keys):
        for src, color, label in ((sft, "tab:blue", "SFT"), (mos, "tab:red", "MOSLIM")):
            if key not in src:
                continue
            vals = [_norm(src[key].get(d), *ranges[d]) for d in dims]
            vals = np.nan_to_num(np.asarray(vals + vals[:1], dtype=np.float64), nan=0.0)
            ax.plot(closed, vals, "o-", color=color, label=label, linewidth=1.5, markersize=3)
            ax.fill(closed, vals, color=color, alpha=0.15)
        ax.set_xticks(angles)
        ax.set_xticklabels(dims, fontsize=8)
        ax.set_ylim(0.0, 1.0)
        ax.set_yticks([0.25, 0.5, 0.75, 1.0])
        ax.set_yticklabels([])
        ax.set_title(key.replace("+", " + ") + " at max", fontsize=9)
    if keys:
        axes[0].legend(loc="lower left", bbox_to_anchor=(-0.25, -0.25), fontsize=8)
    fig.suptitle("Pairs of dimensions at max targets (normalised oracle scores)")
    fig.savefig(path, dpi=100)


def plot_scores(report: dict, path: Path) -> None:
    dims, ranges = _dims(report), _raw_ranges(report)
    fig, (ax,) = _figure(1, 1, (max(5.0, 1.6 * len(dims)), 3.8))
    x = np.arange(len(dims))
    width = 0.38
    series = ((-width / 2, "sft", "tab:blue", "SFT"), (width / 2, "moslim", "tab:red", "MOSLIM"))
    for offset, key, color, label in series:
        raw = [_num(report[key].get(d)) for d in dims]
        vals = np.nan_to_num([_norm(r, *ranges[d]) for r, d in zip(raw, dims)], nan=0.0)
        bars = ax.bar(x + offset, vals, width, color=color, label=label)
        for bar, r in zip(bars, raw):
            ax.annotate(_fmt(r, digits=2), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels(dims)
    ax.set_ylim(0.0, 1.15)
    ax.set_ylabel("normalised score (raw in labels)")
    ax.set_title("Score of each dimension asked for alone at max")
    ax.legend()
    fig.savefig(path, dpi=100)


# ---- entry points ---------------------------------------------------------------------------------
def write_report(out_dir: str | Path, report: dict) -> dict[str, Path]:
    """Write report.json, report.md, controllability.png, pairs_radar.png and scores.png; name → path."""
    missing = [k for k in REQUIRED_KEYS if k not in report]
    if missing:
        raise ReportError(f"report is missing key {missing[0]!r} (required: {', '.join(REQUIRED_KEYS)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "controllability": out / "controllability.png",
        "pairs_radar": out / "pairs_radar.png",
        "scores": out / "scores.png",
    }
    paths["json"].write_text(json.dumps(report_to_jsonable(report), indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(render_markdown(report))
    plot_controllability(report, paths["controllability"])
    plot_pairs_radar(report, paths["pairs_radar"])
    plot_scores(report, paths["scores"])
    if (report.get("overoptimisation") or {}).get("curve"):
        paths["overopt"] = out / "overopt.png"
        plot_overopt(report, paths["overopt"])
    return paths


def format_summary(report: dict) -> str:
    """A compact text table for the terminal: per-dim max-target scores, Δ and Spearman ρ."""
    dims = _dims(report)
    sft_ctrl = _sub(report, "sft", "controllability") or {}
    w = max(9, *(len(d) for d in dims))
    lines = [f"{report['algo']} (seed {report['seed']}) — {_fmt(_num(report['wall_seconds']), digits=1)} s; "
             "oracle scores at max targets",
             f"{'dimension':<{w}}  {'SFT':>7}  {'MOSLIM':>7}  {'Δ':>7}  {'ρ SFT':>6}  {'ρ MOSLIM':>8}"]
    for d in dims:
        s, m = _num(report["sft"].get(d)), _num(report["moslim"].get(d))
        rs = (sft_ctrl.get(d) or {}).get("spearman")
        rm = (report["controllability"].get(d) or {}).get("spearman")
        lines.append(f"{d:<{w}}  {_fmt(s):>7}  {_fmt(m):>7}  {_fmt(m - s, signed=True):>7}  "
                     f"{_fmt(rs, digits=2):>6}  {_fmt(rm, digits=2):>8}")
    s_mean = float(np.mean([_num(report["sft"].get(d)) for d in dims]))
    m_mean = float(np.mean([_num(report["moslim"].get(d)) for d in dims]))
    lines.append(f"{'mean':<{w}}  {_fmt(s_mean):>7}  {_fmt(m_mean):>7}  {_fmt(m_mean - s_mean, signed=True):>7}")
    mr, sr = _sub(report, "moslim", "random_targets"), _sub(report, "sft", "random_targets")
    if mr or sr:
        lines.append(f"random-target MAE (levels, mean over dims): SFT {_fmt((sr or {}).get('mae_mean'))}  "
                     f"MOSLIM {_fmt((mr or {}).get('mae_mean'))}")
    return "\n".join(lines)
