"""``moslim profile RUN_DIR...``: a Markdown + PNG report of the stages' profile.json files.

Each RUN_DIR is searched recursively (a demo directory holds ``sft/``, ``rm/``, ``policy/``; a
compare directory one per trained model). The PNG has the device-hours per stage per run (the
paper's Table 8 analogue: GPU-hours on GPUs, core-hours on CPU) and each stage's phase breakdown.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..profile import find_profiles


def load_profiles(run_dirs) -> list[dict]:
    """One row per profile.json: {run, part, path, profile}."""
    rows = []
    names = [Path(d).name for d in run_dirs]
    for i, d in enumerate(run_dirs):
        # Runs are labelled by directory name; two dirs of one name (runs/a/demo, runs/b/demo) by path.
        prefix = str(d) if names.count(Path(d).name) > 1 else Path(d).name
        for _label, path in find_profiles([d]):
            try:
                prof = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(prof, dict) or "wall_seconds" not in prof or "phases" not in prof:
                raise ValueError(f"{path}: not a moslim profile.json (no wall_seconds / phases)")
            rel = path.parent.relative_to(d)
            part = prof.get("stage", "?") if str(rel) == "." else str(rel)
            rows.append({"index": i, "run": prefix, "part": part, "path": path, "profile": prof})
    return sorted(rows, key=_pipeline_order)


def _pipeline_order(row: dict):
    """Runs in the order given; within a run, SFT → RM → policy, then the rest by path."""
    order = {"sft": 0, "rm": 1, "policy": 2}
    return row["index"], order.get(row["profile"].get("stage"), 3), str(row["path"].parent)


def _num(v, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def _bytes(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def format_markdown(rows: list[dict], png_name: str | None = None) -> str:
    L = ["# moslim profile", "",
         "| run | stage | devices | wall (s) | device-hours | tokens | tokens/s | tokens/s/device | "
         "TFLOP/s/device | MFU | peak memory |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["profile"]
        dev, hours, tok, fl, mfu = p["devices"], p["device_hours"], p["tokens"], p["flops"], p["mfu"]
        mfu_s = f"{mfu['value']:.2%}" if mfu["value"] is not None else f"null ({mfu['reason']})"
        L.append(f"| {r['run']} | {r['part']} | {dev['count']}× {dev['kind']} ({dev['name']}) | {p['wall_seconds']:.1f} | "
                 f"{hours['value']:.4f} {hours['unit']} | {tok['total']} | {tok['per_second']:.0f} | "
                 f"{tok['per_second_per_device']:.0f} | {_num(fl['achieved_tflops_per_device'], '.4f')} | {mfu_s} | "
                 f"{_bytes(p['peak_memory']['bytes'])} |")
    L += ["", "Device-hours: GPU-hours on GPUs (wall × GPUs); core-hours on CPU (wall × torch threads × ranks). "
          "MFU is over each stage's whole wall time.", "",
          "## Device-hours per run (Table 8 analogue)", "", "| run | total | per stage |", "|---|---|---|"]
    for run, parts in _by_run(rows).items():
        units = {r["profile"]["device_hours"]["unit"] for r in parts}
        total = sum(r["profile"]["device_hours"]["value"] for r in parts)
        L.append(f"| {run} | {total:.4f} {' + '.join(sorted(units))} | "
                 + ", ".join(f"{r['part']} {r['profile']['device_hours']['value']:.4f}" for r in parts) + " |")
    L += ["", "## Phase breakdown (seconds, share of wall)", ""]
    for r in rows:
        p = r["profile"]
        wall = p["wall_seconds"]
        L += [f"### {r['run']} / {r['part']} ({p['phases']['aggregate']})", "", "| phase | s | % |", "|---|---|---|"]
        for name, sec in _phase_items(p):
            L.append(f"| {name} | {sec:.2f} | {sec / wall:.1%} |")
        L.append("")
    if png_name:
        L += [f"![profile]({png_name})", ""]
    return "\n".join(L)


def _by_run(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["run"], []).append(r)
    return out


def _phase_items(p: dict) -> list[tuple[str, float]]:
    items = sorted(p["phases"]["seconds"].items(), key=lambda kv: -kv[1])
    return items + [("other", p["phases"]["other_seconds"])]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _by_run(rows)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, max(4, 0.45 * len(rows) + 2)))
    parts = list(dict.fromkeys(r["part"] for r in rows))
    cmap = plt.get_cmap("tab20")
    bottoms = [0.0] * len(runs)
    for i, part in enumerate(parts):
        vals = [next((r["profile"]["device_hours"]["value"] for r in rs if r["part"] == part), 0.0) for rs in runs.values()]
        ax1.bar(list(runs), vals, bottom=bottoms, label=part, color=cmap(i % 20))
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    units = sorted({r["profile"]["device_hours"]["unit"] for r in rows})
    ax1.set_ylabel(" / ".join(units))
    ax1.set_title("Device-hours per stage per run (Table 8 analogue)")
    ax1.legend(fontsize=8)
    phases = list(dict.fromkeys(n for r in rows for n, _ in _phase_items(r["profile"])))
    labels = [f"{r['run']}/{r['part']}" for r in rows]
    left = [0.0] * len(rows)
    for i, ph in enumerate(phases):
        vals = [dict(_phase_items(r["profile"])).get(ph, 0.0) / r["profile"]["wall_seconds"] for r in rows]
        ax2.barh(labels, vals, left=left, label=ph, color=cmap(i % 20))
        left = [a + v for a, v in zip(left, vals)]
    ax2.set_xlabel("share of wall time")
    ax2.set_xlim(0, 1)
    ax2.invert_yaxis()
    ax2.set_title("Phase breakdown")
    ax2.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_profile_report(run_dirs, out_dir) -> tuple[Path, Path, str]:
    """profile_report.md + profile_report.png in ``out_dir``; returns (md, png, markdown text)."""
    rows = load_profiles(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "profile_report.png"
    plot(rows, png)
    text = format_markdown(rows, png.name)
    md = out / "profile_report.md"
    md.write_text(text)
    return md, png, text
