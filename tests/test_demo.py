"""`moslim demo --quick` end to end: every stage runs and the report honours its contract."""

import json
import math

import pytest

from moslim_mega.cli import main


@pytest.mark.slow
def test_quick_demo_writes_the_report_contract(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    # No clock caps: the stages stop on their step counts, so load cannot change what is asserted.
    no_clock = ["sft.max_minutes=0", "rm.max_minutes=0", "policy.max_minutes=0"]
    # Through the multi-seed path (one seed): the run lands in seed_3/ and the table is written;
    # exit status 0 or 1 says whether every seed met the bar (the quick demo is not held to it).
    assert main(["demo", "--quick", "--algo", "rloo", "--seeds", "3", "--out", str(sweep), *no_clock]) in (0, 1)
    out = sweep / "seed_3"
    printed = capsys.readouterr().out
    assert "helpfulness" in printed and "report:" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["algo"] == "rloo" and report["seed"] == 3 and report["wall_seconds"] > 0
    dims = ("helpfulness", "honesty", "harmlessness")
    for d in dims:
        c = report["controllability"][d]
        levels = [0, 1] if d == "harmlessness" else [1, 2, 3, 4, 5]
        assert c["targets"] == levels and len(c["achieved"]) == len(levels)
        assert c["spearman"] is None or -1 <= c["spearman"] <= 1
        assert d in report["sft"] and d in report["moslim"]
    assert set(report["pairs"]) == {"helpfulness+honesty", "helpfulness+harmlessness", "honesty+harmlessness"}
    for scores in report["pairs"].values():
        assert all(math.isfinite(v) for v in scores.values())
    assert set(report["stages"]) >= {"world", "sft", "rm", "policy", "eval_sft", "eval_moslim"}
    for name in ("report.md", "controllability.png", "pairs_radar.png", "scores.png",
                 "sft/model/config.json", "rm/rm.json", "policy/policy/config.json", "policy/metrics.jsonl"):
        assert (out / name).exists(), name
    for stage in ("sft", "rm", "policy"):  # every training stage is profiled (moslim_mega/profile.py)
        prof = json.loads((out / stage / "profile.json").read_text())
        assert prof["stage"] == stage and prof["tokens"]["total"] > 0 and prof["tokens"]["per_second"] > 0
    # The policy stage really trained: all its steps ran and the RM's mapped reward went up.
    # Measured at seed 3 (mean of the last 10 steps − the first 10): +0.118; the step-to-step
    # spread of the first 10 steps is ≈ 0.06, so a mean of 10 moves by ≈ 0.03 without learning.
    rows = [json.loads(x) for x in (out / "policy" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["tag"] == "train"]
    assert len(train) == 40 and train[-1]["kl"] > 0
    first, last = (sum(r["reward"] for r in part) / len(part) for part in (train[:10], train[-10:]))
    assert last > first + 0.05, (first, last)
    # Issue 18: the oracle beside the RM on every step, the detector's verdict, the RM's OOD slice,
    # and the steps each stage really ran (no clock cap was hit here).
    assert all(-1 <= r["agree_helpfulness"] <= 1 and math.isfinite(r["oracle_reward"]) for r in train)
    over = report["overoptimisation"]
    assert isinstance(over["detected"], bool) and 0 <= over["oracle_peak_step"] < 40
    assert len(over["curve"]["kl"]) == len(over["curve"]["oracle_reward"]) > 1
    assert (out / "overopt.png").stat().st_size > 0 and "Reward over-optimisation" in (out / "report.md").read_text()
    assert 0 < report["rm_eval"]["ood"]["pairwise_accuracy"] <= 1
    assert report["stopped_by_max_minutes"] == [] and report["steps"]["policy"] == 40
    table = json.loads((sweep / "seeds.json").read_text())
    assert [r["seed"] for r in table["rows"]] == [3] and table["summary"]["num_seeds"] == 1
    assert table["rows"][0]["rho_helpfulness"] == report["controllability"]["helpfulness"]["spearman"]
    # A second call reuses the finished seed instead of training it again.
    assert main(["demo", "--quick", "--algo", "rloo", "--seeds", "3", "--out", str(sweep), *no_clock]) in (0, 1)
    assert "seed 3: reusing" in capsys.readouterr().out
    # The same --out with another config is refused, not mixed into the table.
    assert main(["demo", "--quick", "--algo", "rloo", "--seeds", "3", "--out", str(sweep), *no_clock,
                 "policy.lr=1e-3"]) == 2
    assert "seed_3 holds a run with another config" in capsys.readouterr().err


@pytest.mark.gpu
def test_quick_demo_trains_on_cuda(tmp_path):
    """On a GPU (run.device=cuda): SFT, RM and policy train on CUDA, so the fused kernels take their
    Triton paths (kernels.impl=auto), and the pipeline still finishes with a sane report."""
    import torch

    torch.cuda.reset_peak_memory_stats()
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--algo", "rloo", "--out", str(out), "run.device=cuda"]) == 0
    assert torch.cuda.max_memory_allocated() > 0
    report = json.loads((out / "report.json").read_text())
    assert all(math.isfinite(v) for s in report["pairs"].values() for v in s.values())
    rows = [json.loads(x) for x in (out / "policy" / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rows if r["tag"] == "train"][-1]["kl"] > 0
