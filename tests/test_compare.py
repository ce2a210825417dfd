"""`moslim compare` end to end on a world smaller than --quick: every method trains, is measured
by the oracle, and the report honours its contract (Table 2 / Figures 5-6 / Table 8 analogues)."""

import json
import math

import pytest

from moslim_mega.cli import main
from moslim_mega.compare import best_methods, parse_methods
from moslim_mega.config import ConfigError

TINY = ["world.num_rm_prompts=100", "world.num_rm_eval_prompts=20", "world.num_sft=200",
        "world.num_policy_prompts=60", "rm.epochs=1", "sft.epochs=1", "policy.steps=3", "policy.prompts_per_step=4",
        "eval.prompts_per_target=2", "compare.dpa_iterations=1", "compare.dpa_prompts_per_iter=8",
        "compare.rsoup_lambda_steps=3", "compare.morlhf_weights=[\"1,1,1\",\"1,0,0\"]",
        # Step budgets only: a loaded machine must not cut a stage short and change what is asserted.
        "rm.max_minutes=0", "sft.max_minutes=0", "policy.max_minutes=0", "compare.dpa_sft_max_minutes=0"]


def test_methods_are_checked():
    assert parse_methods("dpa, moslim,dpa") == ("dpa", "moslim")
    with pytest.raises(ConfigError, match="'ppo' is not one of"):
        parse_methods("moslim,ppo")
    assert best_methods({"a": 1.0, "b": 1.0, "c": 0.5}) == ["a", "b"]


@pytest.mark.slow
def test_capped_stage_is_named_in_the_compare_report():
    from moslim_mega.compare import StageTimer

    timer = StageTimer()
    run = timer.bind("moslim")
    run("rm", lambda: {"steps": 10, "stopped_by_max_minutes": False})
    run("policy", lambda: {"steps": 7, "stopped_by_max_minutes": True})
    assert timer.capped == ["moslim/policy"] and set(timer.seconds["moslim"]) == {"rm", "policy"}


@pytest.mark.slow
def test_tiny_compare_writes_the_report_contract(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--quick", "--out", str(out), *TINY]) == 0
    assert "MORLHF" in capsys.readouterr().out
    rep = json.loads((out / "report.json").read_text())
    methods, dims = ["moslim", "morlhf", "rsoup", "dpa"], ["helpfulness", "honesty", "harmlessness"]
    assert rep["methods"] == methods
    assert rep["stopped_by_max_minutes"] == []  # no clock caps here: every stage ran its step budget
    for m in ["sft", *methods]:
        for d in dims:
            lo, hi = rep["raw_ranges"][d]
            assert lo <= rep["table2"][m][d] <= hi
            c = rep["controllability"][m][d]
            assert len(c["achieved"]) == (2 if d == "harmlessness" else 5)
        assert set(rep["pairs"][m]) == {"helpfulness+honesty", "helpfulness+harmlessness", "honesty+harmlessness"}
        assert math.isfinite(rep["random_target_mae"][m])
    # Table 8: each method's own training stages, shared stages added to its total.
    st = {m: set(rep["compute"][m]["stages"]) for m in methods}
    assert st["moslim"] == {"rm", "policy"}
    assert st["morlhf"] == {"rm_helpfulness", "rm_honesty", "rm_harmlessness", "policy_w0", "policy_w1"}
    assert st["rsoup"] == {"rm_helpfulness", "rm_honesty", "rm_harmlessness",
                           "policy_helpfulness", "policy_honesty", "policy_harmlessness"}
    assert st["dpa"] == {"rm_regression", "sample_1", "sft_1"}
    shared = sum(rep["shared_stages"].values())
    for m in methods:
        c = rep["compute"][m]
        assert c["train_seconds_incl_shared"] == pytest.approx(shared + sum(c["stages"].values()), abs=0.2)
    assert rep["morlhf_weights"] == [[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0]]
    sweep = rep["rsoup_sweep"]["helpfulness+honesty"]
    assert [p["lambda"] for p in sweep] == [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]
    # The controller's rewarder seam really trained MORLHF on Eq. 1: the logged mean reward is
    # Σ w_i · (logged mean r_i) on every step, for both weight vectors.
    for i, w in enumerate(rep["morlhf_weights"]):
        rows = [json.loads(x) for x in (out / "morlhf" / f"policy_w{i}" / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["tag"] == "train"]
        assert len(train) == 3
        for r in train:
            assert r["reward"] == pytest.approx(sum(wi * r[f"reward_{d}"] for wi, d in zip(w, dims)), abs=1e-5)
            assert all(0 <= r[f"reward_{d}"] <= 1 for d in dims)
    for w in rep["winners"].values():
        assert w and set(w) <= set(methods)
    for name in ("report.md", "table2.png", "controllability.png", "pairs_radar.png", "pair_fronts.png",
                 "dpa/policy/config.json", "dpa/rm/head.safetensors", "rsoup/merged"):
        assert (out / name).exists(), name
    md = (out / "report.md").read_text()
    assert "Table 2 analogue" in md and "Table 8 analogue" in md and "λ sweep" in md
