"""Multi-seed reports: one row per seed's demo report, mean ± std over seeds (issue 18).

A training result from one seed is an anecdote. ``moslim demo --seeds 0-9,11`` runs the demo once
per seed (``<out>/seed_<n>/``) and writes ``seeds.json`` and ``seeds.md``: per seed the oracle's
Spearman ρ per dimension, the named-dimension gain over SFT (mean over dimensions of the
targeted-max score, MOSLIM − SFT), the random-target MAE of SFT and MOSLIM, the on-policy
RM–oracle agreement at the end of training, where the oracle reward peaked, and whether the
seed meets the bar; then mean ± std and the count of seeds that meet it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# The demo's bar (README): ρ ≥ 0.8 on these dims, gain over SFT > 0, random-target MAE below SFT's.
BAR_RHO = 0.8
BAR_DIMS = ("helpfulness", "honesty")


class SeedsError(ValueError):
    """A bad ``--seeds`` list or a missing per-seed report."""


def parse_seeds(text: str) -> list[int]:
    """``"0-9,11"`` → [0, 1, …, 9, 11]; duplicates removed, order kept."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            seeds = range(int(lo), int(hi) + 1) if sep else [int(lo)]
        except ValueError:
            raise SeedsError(f"--seeds {text!r}: {part!r} is not N or A-B") from None
        if sep and int(hi) < int(lo):
            raise SeedsError(f"--seeds {text!r}: range {part!r} is empty")
        out += [s for s in seeds if s not in out]
    if not out:
        raise SeedsError(f"--seeds {text!r}: no seed")
    return out


def _f(x) -> float:
    """A report number; report.json writes NaN as null."""
    return math.nan if x is None else float(x)


def _named_mean(scores: dict) -> float:
    return float(np.mean([v for v in scores.values()])) if scores else math.nan


def seed_row(report: dict, bar_dims: Sequence[str] = BAR_DIMS, bar_rho: float = BAR_RHO) -> dict:
    """The table row of one demo report (report.json)."""
    ctrl = report["controllability"]
    rho = {d: _f(v["spearman"]) for d, v in ctrl.items()}
    gain = _named_mean(report["moslim"]) - _named_mean(report["sft"])
    mae_sft = _f(report["sft_eval"].get("random_targets", {}).get("mae_mean"))
    mae_moslim = _f(report["moslim_eval"].get("random_targets", {}).get("mae_mean"))
    over = report.get("overoptimisation") or {}
    missing = [d for d in bar_dims if d not in rho]
    if missing:
        raise SeedsError(f"seed {report.get('seed')}: the report has no dimension {missing[0]!r} for the bar")
    meets = (all(rho[d] >= bar_rho for d in bar_dims) and gain > 0 and mae_moslim < mae_sft)
    return {
        "seed": report["seed"],
        "algo": report["algo"],
        **{f"rho_{d}": r for d, r in rho.items()},
        "gain_over_sft": gain,
        "mae_sft": mae_sft,
        "mae_moslim": mae_moslim,
        "agree_final": _f(over.get("agree_final")),
        "oracle_peak_step": _f(over.get("oracle_peak_step")),
        "overopt_detected": bool(over.get("detected", False)),
        "overopt_signals": ",".join(over.get("signals") or []),
        "kl_final": _f(over.get("kl_final")),
        "policy_steps": _f((report.get("steps") or {}).get("policy")),
        "capped": ",".join(report.get("stopped_by_max_minutes") or []),
        "wall_seconds": _f(report.get("wall_seconds")),
        "meets_bar": meets,
    }


def aggregate(rows: list[dict]) -> dict:
    """mean and (sample) std over seeds of every numeric column; the bar count."""
    stats = {}
    for key in rows[0]:
        vals = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)]
        vals = [v for v in vals if math.isfinite(v)]
        if key == "seed" or not vals:
            continue
        stats[key] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
    return {"num_seeds": len(rows), "meets_bar": sum(bool(r["meets_bar"]) for r in rows),
            "overopt_detected": sum(bool(r["overopt_detected"]) for r in rows), "stats": stats}


def _cell(v, bad=False) -> str:
    """``bad``: the value a reader must not miss (a missed bar, a detection) is set in bold."""
    if isinstance(v, bool):
        text = "yes" if v else "no"
        return f"**{text}**" if v == bad else text
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else (f"{v:.0f}" if abs(v) >= 100 else f"{v:.2f}")
    return str(v) if v not in ("", None) else "–"


COLUMNS = ("seed", "rho_helpfulness", "rho_honesty", "rho_harmlessness", "gain_over_sft", "mae_sft", "mae_moslim",
           "agree_final", "oracle_peak_step", "overopt_detected", "overopt_signals", "kl_final", "policy_steps", "capped",
           "wall_seconds", "meets_bar")


def render_markdown(rows: list[dict], summary: dict, bar_dims: Sequence[str] = BAR_DIMS,
                    bar_rho: float = BAR_RHO) -> str:
    cols = [c for c in COLUMNS if any(c in r for r in rows)]
    cols += [c for c in rows[0] if c.startswith("rho_") and c not in cols]
    lines = [f"# MOSLIM demo over {summary['num_seeds']} seeds ({rows[0]['algo']})", "",
             f"Bar: ρ ≥ {bar_rho} on {', '.join(bar_dims)}, named-dimension gain over SFT > 0, random-target MAE "
             f"below SFT's. **{summary['meets_bar']} of {summary['num_seeds']} seeds meet it.** "
             f"Over-optimisation detected (the oracle reward fell from its peak while the RM's held, the "
             f"RM−oracle gap grew, or a dimension's RM–oracle agreement collapsed) in "
             f"{summary['overopt_detected']}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    bad = {"meets_bar": False, "overopt_detected": True}
    lines += ["| " + " | ".join(_cell(r.get(c, ""), bad.get(c, False)) for c in cols) + " |" for r in rows]
    st = summary["stats"]
    digits = lambda m: 0 if abs(m) >= 100 else 2  # noqa: E731
    lines.append("| **mean ± std** | " + " | ".join(
        f"{st[c]['mean']:.{digits(st[c]['mean'])}f} ± {st[c]['std']:.{digits(st[c]['mean'])}f}" if c in st else ""
        for c in cols[1:]) + " |")
    lines += ["", "Columns: ρ = the oracle's Spearman correlation of asked vs delivered level (held-out prompts); "
              "gain = mean over dimensions of the targeted-max oracle score, MOSLIM − SFT; MAE = mean |oracle level "
              "− target| on random multi-dimension targets; agree_final = Spearman of the RM's mapped term vs the "
              "oracle's closeness to the target on the policy's own samples, last 50 steps; oracle_peak_step = step "
              "of the smoothed oracle reward's maximum; kl_final = sequence KL to the SFT policy at the end (nats); "
              "capped = stages stopped by their max_minutes safety net.", ""]
    return "\n".join(lines)


def write_seed_table(out_dir: str | Path, reports: list[dict], bar_dims: Sequence[str] = BAR_DIMS,
                     bar_rho: float = BAR_RHO) -> dict:
    """seeds.json + seeds.md in ``out_dir``; returns the summary."""
    rows = [seed_row(r, bar_dims, bar_rho) for r in reports]
    summary = aggregate(rows)
    out = Path(out_dir)
    (out / "seeds.json").write_text(json.dumps({"rows": rows, "summary": summary,
                                                "bar": {"dims": list(bar_dims), "rho": bar_rho}}, indent=2))
    (out / "seeds.md").write_text(render_markdown(rows, summary, bar_dims, bar_rho))
    return summary
