import json
import subprocess
import sys

import pytest

from moslim_mega.cli import main


def test_world_build_writes_every_set(tmp_path, capsys):
    assert main(["world", "build", "--out", str(tmp_path), "world.num_rm_prompts=20", "world.num_sft=10",
                 "world.num_policy_prompts=30", "world.num_rm_eval_prompts=5"]) == 0
    for name in ("rm_train", "rm_eval", "rm_eval_ood", "sft", "policy_train", "policy_eval"):
        assert (tmp_path / f"{name}.jsonl").stat().st_size > 0
    assert json.loads((tmp_path / "world.json").read_text())["counts"]["rm_train"] == 80


def test_bad_override_is_one_clear_error(tmp_path, capsys):
    assert main(["world", "build", "--out", str(tmp_path), "world.nope=1"]) == 2
    assert "unknown config key 'world.nope'" in capsys.readouterr().err
    assert main(["rm", "train", "--out", str(tmp_path), "rm.batch_size=big"]) == 2
    assert "rm.batch_size" in capsys.readouterr().err


def test_config_doc_lists_every_key(capsys):
    assert main(["config", "doc"]) == 0
    out = capsys.readouterr().out
    assert "`rm.loss`" in out and "`mapping.kind`" in out and "`prefs.datatype`" in out


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("rmcli")
    args = ["rm", "train", "--out", str(out), "world.num_rm_prompts=200", "world.num_rm_eval_prompts=30",
            "rm.model.hidden_size=32", "rm.model.intermediate_size=64", "rm.epochs=0.5", "run.tensorboard=false"]
    assert main(args) == 0
    return out


def test_rm_eval_json_has_the_documented_shape(rm_dir, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["rm", "eval", "--rm", str(rm_dir), "--data", str(rm_dir / "data" / "rm_eval.jsonl"), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    for name in ("helpfulness", "honesty", "harmlessness"):
        head = report["heads"][name]
        assert {"intensity_accuracy", "majority_rate", "pairwise_accuracy", "confusion"} <= set(head)
        k = 2 if name == "harmlessness" else 5
        assert len(head["confusion"]) == k and sum(map(sum, head["confusion"])) == report["num_examples"]
    assert {"intensity_accuracy", "pairwise_accuracy"} <= set(report["mean"])


def test_rm_eval_reports_the_ood_slice(rm_dir, tmp_path, capsys):
    """`--slice ood=…` adds the same report for the world's out-of-distribution responses; the
    training run already reported it (rm.train finds rm_eval_ood.jsonl beside rm_eval.jsonl)."""
    out, ood = tmp_path / "eval.json", rm_dir / "data" / "rm_eval_ood.jsonl"
    assert main(["rm", "eval", "--rm", str(rm_dir), "--data", str(rm_dir / "data" / "rm_eval.jsonl"),
                 "--slice", f"ood={ood}", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["slices"]["ood"]["data"] == str(ood)
    assert report["slices"]["ood"]["num_examples"] == sum(1 for _ in ood.open())
    assert report["slices"]["ood"]["mean"] != report["mean"]
    assert "slice ood:" in capsys.readouterr().out
    trained = json.loads((rm_dir / "eval.json").read_text())
    assert trained["slices"]["ood"]["mean"] == pytest.approx(report["slices"]["ood"]["mean"], abs=1e-5)
    with pytest.raises(SystemExit, match="NAME=PATH"):
        main(["rm", "eval", "--rm", str(rm_dir), "--data", str(ood), "--slice", "ood", "--json", str(out)])


def test_rm_score_runs_as_a_console_script(rm_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "moslim_mega.cli", "rm", "score", "--rm", str(rm_dir),
         "--prompt", "<helpfulness max><harmless 1>tell me about garden", "--response", "garden_fact_a"],
        capture_output=True, text=True, check=True,
    )
    out = json.loads(proc.stdout)
    assert out["prompt_seen_by_rm"] == "tell me about garden"
    assert out["targets"] == {"helpfulness": 5, "harmlessness": 1}
    assert abs(sum(out["heads"]["helpfulness"]["probs"].values()) - 1) < 1e-4
    assert out["heads"]["honesty"]["target_level"] is None and out["heads"]["honesty"]["mapped_term"] == 0.0
    # Eq. 11 with k = all 3 heads: reward = (term_help + term_harm) / 3
    terms = [h["mapped_term"] for h in out["heads"].values()]
    assert abs(out["reward"] - sum(terms) / 3) < 1e-5


def test_rm_score_rejects_a_bad_prefix(rm_dir, capsys):
    assert main(["rm", "score", "--rm", str(rm_dir), "--prompt", "<kindness 3>hi", "--response", "x"]) == 2
    assert "<kindness 3>" in capsys.readouterr().err
