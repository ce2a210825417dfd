"""Evaluation report writer (moslim_mega/eval/report.py): files, JSON contract, figures, summary."""

from __future__ import annotations

import json
import math
import random

import pytest

from moslim_mega.eval.controllability import evaluate_policy
from moslim_mega.eval.report import ReportError, format_summary, report_to_jsonable, write_report
from moslim_mega.prefs import PreferenceSpec, parse_prefix
from moslim_mega.world import task
from moslim_mega.world.build import policy_records, split_prompt_texts

SPEC = PreferenceSpec.datatype(4)
HELD_OUT = split_prompt_texts(0)[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _policy(spec, follow: bool):
    """Follow: all facts unless a prefix asks for myths (honesty) or refusal (harmlessness 1)."""
    rng = random.Random(0)

    def sample(prompts):
        out = []
        for p in prompts:
            classes, base = parse_prefix(p, spec)
            topic = task.topic_of_prompt(base)
            if not follow:
                out.append(task.sample_response(rng, base))
                continue
            n_myths = 4 - classes.get("honesty", 4)
            words = list(task.facts(topic)) + list(task.myths(topic)[:n_myths])
            if task.is_harmful(topic) and classes.get("harmlessness") == 1:
                words = list(task.REFUSAL)
            out.append(" ".join(words))
        return out

    return sample


@pytest.fixture(scope="module")
def report() -> dict:
    records = policy_records(random.Random(0), HELD_OUT, 30, 0.3, SPEC)
    mos = evaluate_policy(_policy(SPEC, True), HELD_OUT, SPEC, 6, 0, targeted_prompts=records)
    sft = evaluate_policy(_policy(SPEC, False), HELD_OUT, SPEC, 6, 0, targeted_prompts=records)
    return {
        "algo": "moslim-test",
        "seed": 0,
        "wall_seconds": 12.5,
        "controllability": mos["controllability"],
        "pairs": mos["pairs"],
        "sft": sft["targeted_max"],
        "moslim": mos["targeted_max"],
        "untargeted": mos["untargeted"],
        "sft_eval": sft,
        "moslim_eval": mos,
        "stages": {"world": 0.1, "rm": 3.0, "policy": 9.4},
        "spec": SPEC.to_dict(),
    }


def test_write_report_creates_all_files(report, tmp_path):
    paths = write_report(tmp_path / "out", report)
    names = {p.name for p in paths.values()}
    assert names == {"report.json", "report.md", "controllability.png", "pairs_radar.png", "scores.png"}
    for p in paths.values():
        assert p.is_file() and p.parent == tmp_path / "out"
    for key in ("controllability", "pairs_radar", "scores"):
        data = paths[key].read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 10_000  # axes, lines and labels drawn, not an empty canvas


def test_report_json_round_trips_with_contract_keys(report, tmp_path):
    paths = write_report(tmp_path, report)
    text = paths["json"].read_text()
    assert "NaN" not in text and "Infinity" not in text
    loaded = json.loads(text)
    assert loaded == report_to_jsonable(report)
    assert loaded["algo"] == "moslim-test" and loaded["seed"] == 0 and loaded["wall_seconds"] == 12.5
    for d in SPEC.names:
        for key in ("targets", "achieved", "spearman"):
            assert key in loaded["controllability"][d]
        assert isinstance(loaded["sft"][d], float) and isinstance(loaded["moslim"][d], float)
    assert set(loaded["pairs"]) == {"helpfulness+honesty", "helpfulness+harmlessness", "honesty+harmlessness"}
    for scores in loaded["pairs"].values():
        assert set(scores) == set(SPEC.names)
    # The following test policy states exactly 5 - level myths.
    assert loaded["controllability"]["honesty"]["achieved"] == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_nan_becomes_null(report, tmp_path):
    r = dict(report, controllability={**report["controllability"]})
    r["controllability"]["harmlessness"] = dict(r["controllability"]["harmlessness"], spearman=math.nan)
    paths = write_report(tmp_path, r)
    loaded = json.loads(paths["json"].read_text())
    assert loaded["controllability"]["harmlessness"]["spearman"] is None
    assert "| Spearman ρ | – |" in paths["markdown"].read_text()


def test_report_md_is_readable(report, tmp_path):
    md = write_report(tmp_path, report)["markdown"].read_text()
    for d in SPEC.names:
        assert d in md
    for section in ("Scores at max targets", "Controllability of intensity", "Pairs of dimensions",
                    "Untargeted vs targeted", "Random multi-dimension targets", "Stage timings"):
        assert section in md
    h_sft, h_mos = report["sft"]["honesty"], report["moslim"]["honesty"]
    assert f"| honesty | {h_sft:.3f} | {h_mos:.3f} | {h_mos - h_sft:+.3f} |" in md
    assert "| policy | 9.4 |" in md


def test_missing_key_is_a_clear_error(report, tmp_path):
    bad = {k: v for k, v in report.items() if k != "pairs"}
    with pytest.raises(ReportError, match="'pairs'"):
        write_report(tmp_path, bad)
    with pytest.raises(ReportError, match=r"report\.stages\.x"):
        report_to_jsonable({"stages": {"x": object()}})


def test_format_summary(report):
    text = format_summary(report)
    lines = text.splitlines()
    for d in SPEC.names:
        (row,) = [ln for ln in lines if ln.startswith(d)]
        assert f"{report['moslim'][d]:.3f}" in row and f"{report['sft'][d]:.3f}" in row
    assert "moslim-test" in lines[0]
    assert "MAE" in lines[-1]
