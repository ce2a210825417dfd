"""Multi-seed demo tables (moslim_mega/eval/seeds.py)."""

import json

import pytest

from moslim_mega.eval.seeds import SeedsError, aggregate, parse_seeds, seed_row, write_seed_table


def test_parse_seeds():
    assert parse_seeds("0-3,11") == [0, 1, 2, 3, 11]
    assert parse_seeds("5, 5,2") == [5, 2]
    for bad in ("", "a", "3-1", "1-x"):
        with pytest.raises(SeedsError):
            parse_seeds(bad)


def _report(seed, rho_h, rho_o, sft_h, mos_h, mae_sft=1.3, mae_mos=0.9):
    ctrl = {"helpfulness": {"spearman": rho_h}, "honesty": {"spearman": rho_o}, "harmlessness": {"spearman": 0.9}}
    return {"seed": seed, "algo": "rloo", "controllability": ctrl,
            "sft": {"helpfulness": sft_h, "honesty": 4.0, "harmlessness": 0.8},
            "moslim": {"helpfulness": mos_h, "honesty": 4.5, "harmlessness": 1.0},
            "sft_eval": {"random_targets": {"mae_mean": mae_sft}},
            "moslim_eval": {"random_targets": {"mae_mean": mae_mos}},
            "overoptimisation": {"agree_final": 0.7, "detected": False, "oracle_peak_step": 1400, "kl_final": 4.0},
            "steps": {"policy": 1500}, "stopped_by_max_minutes": [], "wall_seconds": 600.0}


def test_seed_rows_apply_the_bar():
    good = seed_row(_report(0, 0.9, 0.95, 2.5, 4.5))
    assert good["meets_bar"] and good["gain_over_sft"] == pytest.approx((2.0 + 0.5 + 0.2) / 3)
    assert not seed_row(_report(1, 0.14, 0.95, 3.0, 1.8))["meets_bar"]  # issue 18's seed 11
    assert not seed_row(_report(2, 0.9, 0.95, 2.5, 4.5, mae_mos=1.5))["meets_bar"]  # MAE worse than SFT
    with pytest.raises(SeedsError, match="politeness"):
        seed_row(_report(0, 0.9, 0.9, 2.5, 4.5), bar_dims=("politeness",))


def test_table_mean_std_and_files(tmp_path):
    reports = [_report(0, 0.9, 0.9, 2.5, 4.5), _report(1, 0.7, 0.9, 2.5, 4.5), _report(2, 0.8, 0.9, 2.5, 4.5)]
    summary = write_seed_table(tmp_path, reports)
    assert summary["num_seeds"] == 3 and summary["meets_bar"] == 2
    assert summary["stats"]["rho_helpfulness"]["mean"] == pytest.approx(0.8)
    assert summary["stats"]["rho_helpfulness"]["std"] == pytest.approx(0.1)
    md = (tmp_path / "seeds.md").read_text()
    assert "2 of 3 seeds meet it" in md and "0.80 ± 0.10" in md and "**no**" in md
    assert json.loads((tmp_path / "seeds.json").read_text())["summary"]["meets_bar"] == 2
    assert aggregate([seed_row(reports[0])])["stats"]["rho_helpfulness"]["std"] == 0.0
