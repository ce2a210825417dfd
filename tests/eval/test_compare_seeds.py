"""Multi-seed ``moslim compare`` (moslim_mega/eval/compare_seeds.py, compare.run_compare_seeds).

The per-seed reports are made by the real ``build_report`` from hand-written evaluation results
and round-tripped through JSON as report.json is, so the structure is exactly a compare run's; no
model is trained (``run_compare`` is replaced by a writer of such a report)."""

import json
import math
import statistics

import pytest

from moslim_mega import compare
from moslim_mega.cli import main
from moslim_mega.config import ConfigError, save_config
from moslim_mega.eval.compare_seeds import quantities, report_rows, summarise, write_compare_seeds
from moslim_mega.eval.report import report_to_jsonable
from moslim_mega.eval.seeds import SeedsError
from moslim_mega.prefs import spec_from_config

DIMS = ("helpfulness", "honesty", "harmlessness")
PAIRS = ("helpfulness+honesty", "helpfulness+harmlessness", "honesty+harmlessness")

# Per seed 0, 1, 2: (MOSLIM, RSoup). RSoup has the best helpfulness mean (3.67 vs 3.00) but MOSLIM
# wins two of the three seeds; harmlessness is a tie on every seed; MOSLIM's honesty ρ is undefined
# on seed 1; MAE is lower-is-better (MOSLIM wins although its values are the smaller ones).
HELP = [(2.0, 5.0), (3.0, 2.5), (4.0, 3.5)]
RHO_HON = [(0.8, 0.0), (math.nan, 0.1), (0.6, -0.1)]
MAE = [(0.9, 1.3), (1.0, 1.3), (1.1, 1.3)]
RM_SECONDS = [(100.0, 300.0), (110.0, 280.0), (90.0, 320.0)]


def _eval(help_, honesty, harm, rho_hon, mae, pair_help):
    return {"targeted_max": {"helpfulness": help_, "honesty": honesty, "harmlessness": harm},
            "controllability": {"helpfulness": {"spearman": 0.5}, "honesty": {"spearman": rho_hon},
                                "harmlessness": {"spearman": math.nan}},
            "pairs": {p: {"helpfulness": pair_help, "honesty": 4.0, "harmlessness": 1.0} for p in PAIRS},
            "untargeted": {d: 3.0 for d in DIMS}, "random_targets": {"mae_mean": mae}}


def fake_report(seed: int, methods=("moslim", "rsoup"), cfg=None) -> dict:
    """What report.json holds after a compare run of ``methods`` with run.seed=seed."""
    cfg = cfg or compare.compare_config(True, [f"run.seed={seed}"])
    spec = spec_from_config(cfg.prefs)
    evals = {"sft": _eval(2.5, 4.0, 0.8, 0.0, 1.4, 2.0)}
    seconds = {"shared": {"world": 1.0, "sft": 9.0}, "sft": {"eval": 2.0}}
    for i, m in enumerate(methods):
        k = i % 2
        evals[m] = _eval(HELP[seed % 3][k], 4.5, 1.0, RHO_HON[seed % 3][k], MAE[seed % 3][k], 3.0)
        seconds[m] = {"rm": RM_SECONDS[seed % 3][k], "eval": 5.0}
    report = compare.build_report(cfg, spec, tuple(methods), evals, seconds, {}, 1000.0)
    return json.loads(json.dumps(report_to_jsonable(report)))


@pytest.fixture
def reports():
    return [fake_report(s) for s in (0, 1, 2)]


def test_quantities_follow_the_single_seed_table(reports):
    keys = [q.key for q in quantities(reports[0])]
    assert keys == ["table2.helpfulness", "table2.honesty", "table2.harmlessness", "table2.mean_normalised",
                    "random_target_mae", "train_seconds", "spearman.helpfulness", "spearman.honesty",
                    "spearman.harmlessness", *[f"pair_score.{p}" for p in PAIRS]]
    assert report_rows(reports[0]) == ["sft", "moslim", "rsoup"]
    no_sft = {**reports[0], "table2": {m: v for m, v in reports[0]["table2"].items() if m != "sft"}}
    assert report_rows(no_sft) == ["moslim", "rsoup"]


def test_mean_std_per_method(reports):
    q = summarise(reports)["quantities"]
    h = q["table2.helpfulness"]["stats"]
    assert h["moslim"]["values"] == [2.0, 3.0, 4.0]
    assert h["moslim"]["mean"] == pytest.approx(3.0) and h["moslim"]["std"] == pytest.approx(1.0)
    assert h["rsoup"]["mean"] == pytest.approx(11 / 3)
    assert h["rsoup"]["std"] == pytest.approx(statistics.stdev([5.0, 2.5, 3.5]))
    assert h["sft"]["mean"] == pytest.approx(2.5) and h["sft"]["std"] == 0.0
    # ρ undefined on one seed: averaged over the two where it is, and says so.
    rho = q["spearman.honesty"]["stats"]["moslim"]
    assert rho["n"] == 2 and rho["mean"] == pytest.approx(0.7) and rho["std"] == pytest.approx(statistics.stdev([0.8, 0.6]))
    assert math.isnan(rho["values"][1])
    assert q["spearman.harmlessness"]["stats"]["moslim"]["n"] == 0
    # Train seconds include the shared world + SFT (10 s), not the evaluation.
    t = q["train_seconds"]["stats"]["moslim"]
    assert t["values"] == [110.0, 120.0, 100.0] and t["mean"] == pytest.approx(110.0)
    assert q["train_seconds"]["stats"]["sft"]["values"] == [10.0, 10.0, 10.0]


def test_winners_best_mean_and_seed_counts(reports):
    q = summarise(reports)["quantities"]
    help_ = q["table2.helpfulness"]
    assert help_["best_mean"] == ["rsoup"]
    assert help_["seed_winners"] == [["rsoup"], ["moslim"], ["moslim"]]
    assert help_["seed_wins"] == {"moslim": 2, "rsoup": 1}  # the SFT start is no contender
    harm = q["table2.harmlessness"]
    assert harm["best_mean"] == ["moslim", "rsoup"] and harm["seed_wins"] == {"moslim": 3, "rsoup": 3}
    mae = q["random_target_mae"]
    assert mae["better"] == "lower" and mae["best_mean"] == ["moslim"] and mae["seed_wins"] == {"moslim": 3, "rsoup": 0}
    t = q["train_seconds"]
    assert t["best_mean"] == ["moslim"] and t["seed_wins"] == {"moslim": 3, "rsoup": 0}
    # A seed where MOSLIM's ρ is undefined goes to the method that has one.
    assert q["spearman.honesty"]["seed_winners"] == [["moslim"], ["rsoup"], ["moslim"]]
    assert q["spearman.harmlessness"]["seed_winners"] == [[], [], []]
    assert q["spearman.harmlessness"]["best_mean"] == []
    # The single-seed report's own winners agree with the per-seed winners here.
    assert [r["winners"]["helpfulness"] for r in reports] == help_["seed_winners"]


def test_files_and_markdown_lines(reports, tmp_path):
    write_compare_seeds(tmp_path, reports)
    data = json.loads((tmp_path / "seeds.json").read_text())
    assert data["seeds"] == [0, 1, 2] and data["methods"] == ["moslim", "rsoup"]
    assert data["quantities"]["spearman.honesty"]["stats"]["moslim"]["values"][1] is None  # NaN → null
    assert data["quantities"]["table2.helpfulness"]["seed_wins"] == {"moslim": 2, "rsoup": 1}
    lines = (tmp_path / "seeds.md").read_text().splitlines()
    assert lines[0] == "# moslim compare over 3 seeds — MOSLIM, RSoup"
    assert any(line.startswith("| MOSLIM | 3.00 ± 1.00 | 4.50 ± 0.00 | 1.00 ± 0.00 |") for line in lines)
    assert any(line.startswith("| SFT | 2.50 ± 0.00 |") for line in lines)
    assert "| MOSLIM | 0.50 ± 0.00 | 0.70 ± 0.14 (n=2) | – |" in lines
    assert "| helpfulness at max | higher | **RSoup** | MOSLIM 2/3, RSoup 1/3 |" in lines
    assert "| harmlessness at max | higher | **MOSLIM = RSoup** | MOSLIM 3/3, RSoup 3/3 |" in lines
    assert "| random-target MAE | lower | **MOSLIM** | MOSLIM 3/3, RSoup 0/3 |" in lines
    assert "| ρ harmlessness | higher | – | MOSLIM 0/3, RSoup 0/3 |" in lines
    assert "| helpfulness at max | RSoup | **5.00** | 2.50 | 3.50 |" in lines
    assert "| helpfulness at max | SFT | 2.50 | 2.50 | 2.50 |" in lines
    assert "| ρ honesty | MOSLIM | **0.80** | – | **0.60** |" in lines
    assert "| quantity | method | seed 0 | seed 1 | seed 2 |" in lines


def test_reports_of_different_comparisons_are_refused(reports):
    other = fake_report(3, methods=("moslim", "dpa"))
    with pytest.raises(SeedsError, match=r"seed 3: its methods \['moslim', 'dpa'\] differ from seed 0's"):
        summarise([reports[0], other])
    with pytest.raises(SeedsError, match="seed 0 appears twice"):
        summarise([reports[0], reports[0]])
    with pytest.raises(SeedsError, match="no per-seed report"):
        summarise([])
    broken = json.loads(json.dumps(reports[1]))
    del broken["random_target_mae"]["rsoup"]
    with pytest.raises(SeedsError, match=r"seed 1: report.json has no random_target_mae\['rsoup'\]"):
        summarise([reports[0], broken])


@pytest.fixture
def fake_runs(monkeypatch):
    """run_compare replaced by a writer of config.yaml + a fake report.json; returns the calls."""
    calls = []

    def run(cfg, out_dir, methods=None, show_progress=True):
        calls.append((cfg.run.seed, cfg.world.seed, tuple(methods)))
        save_config(cfg, out_dir)
        report = fake_report(cfg.run.seed, methods, cfg)
        (out_dir / "report.json").write_text(json.dumps(report))
        return report

    monkeypatch.setattr(compare, "run_compare", run)
    return calls


def test_seeds_run_once_each_then_resume(tmp_path, fake_runs, capsys):
    out, extra = tmp_path / "cmp", ["policy.steps=3"]
    summary = compare.run_compare_seeds([0, 1], True, extra, out, "moslim,rsoup")
    assert fake_runs == [(0, 0, ("moslim", "rsoup")), (1, 0, ("moslim", "rsoup"))]  # world.seed stays the recipe's
    assert summary["seeds"] == [0, 1] and (out / "seeds.md").is_file()
    assert "policy:\n" in (out / "seed_1" / "config.yaml").read_text()
    assert "steps: 3" in (out / "seed_1" / "config.yaml").read_text()
    summary = compare.run_compare_seeds([0, 1, 2], True, extra, out, "moslim,rsoup")
    assert fake_runs[2:] == [(2, 0, ("moslim", "rsoup"))]  # seeds 0 and 1 reused
    assert "seed 0: reusing" in capsys.readouterr().out
    assert json.loads((out / "seeds.json").read_text())["seeds"] == [0, 1, 2]
    assert summary["quantities"]["table2.helpfulness"]["seed_wins"] == {"moslim": 2, "rsoup": 1}


def test_a_seed_dir_of_another_config_or_methods_is_an_error(tmp_path, fake_runs):
    out = tmp_path / "cmp"
    compare.run_compare_seeds([0], True, ["policy.steps=3"], out, "moslim,rsoup")
    with pytest.raises(ConfigError, match="seed_0 holds a compare run with another config"):
        compare.run_compare_seeds([0], True, ["policy.steps=4"], out, "moslim,rsoup")
    with pytest.raises(ConfigError, match=r"seed_0 holds a compare run of methods \['moslim', 'rsoup'\], not \['moslim'\]"):
        compare.run_compare_seeds([0], True, ["policy.steps=3"], out, "moslim")
    assert len(fake_runs) == 1
    # A report without its config.yaml cannot be shown to match: refused, not reused.
    (out / "seed_0" / "config.yaml").unlink()
    with pytest.raises(ConfigError, match="differs or is missing"):
        compare.run_compare_seeds([0], True, ["policy.steps=3"], out, "moslim,rsoup")


def test_an_interrupted_seed_dir_reruns_only_with_its_config(tmp_path, fake_runs):
    out = tmp_path / "cmp"
    save_config(compare.compare_config(True, ["policy.steps=3", "run.seed=0"]), out / "seed_0")  # no report.json
    compare.run_compare_seeds([0], True, ["policy.steps=3"], out, "moslim,rsoup")
    assert fake_runs == [(0, 0, ("moslim", "rsoup"))]
    save_config(compare.compare_config(True, ["policy.steps=3", "run.seed=1"]), out / "seed_2")
    with pytest.raises(ConfigError, match="seed_2 holds a compare run with another config"):
        compare.run_compare_seeds([2], True, ["policy.steps=3"], out, "moslim,rsoup")


def test_run_seed_override_is_refused(tmp_path, fake_runs):
    with pytest.raises(ConfigError, match="run.seed: --seeds sets it"):
        compare.run_compare_seeds([0, 1], True, [" run.seed =3"], tmp_path, None)
    assert fake_runs == []


def test_cli_seeds(tmp_path, fake_runs, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--quick", "--seeds", "1-2", "--methods", "moslim,rsoup", "--out", str(out),
                 "policy.steps=3"]) == 0
    assert [c[0] for c in fake_runs] == [1, 2]
    assert "# moslim compare over 2 seeds" in capsys.readouterr().out
    assert main(["compare", "--quick", "--seeds", "2-1", "--out", str(out)]) == 2
    assert "--seeds '2-1': range '2-1' is empty" in capsys.readouterr().err
    assert len(fake_runs) == 2
