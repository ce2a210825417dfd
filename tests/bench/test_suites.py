"""Fixture-sized end-to-end runs of every suite through ``moslim eval bench`` (in-process CLI)."""

import json

import pytest
from bench_fixture_data import HACKAPROMPT, HALUEVAL, MTBENCH, REWARDBENCH, write_jsonl

from moslim_mega.bench import mtbench
from moslim_mega.bench.generate import ChatModel
from moslim_mega.bench.judges import HFJudge
from moslim_mega.bench.rewardbench import section_scores
from moslim_mega.cli import main
from moslim_mega.config import BenchConfig
from moslim_mega.reward.evaluate import score_one
from tiny_lm import POLICY_REPLY

SHORT = ["bench.max_new_tokens=12", "bench.judge_max_tokens=24"]


def _bench(tmp_path, suite, data, *extra):
    out = tmp_path / f"out_{suite}"
    rc = main(["eval", "bench", "--suite", suite, "--data", str(data), "--out", str(out), *extra, *SHORT])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert (out / "config.yaml").is_file()
    return report, rows


@pytest.mark.slow
def test_mtbench_end_to_end(tmp_path, policy_dir, judge_dir):
    data = write_jsonl(tmp_path / "question.jsonl", MTBENCH)
    report, rows = _bench(tmp_path, "mtbench", data, "--policy", str(policy_dir), "--judge", f"hf:{judge_dir}")
    assert report["judge"]["spec"] == f"hf:{judge_dir}" and report["judge"]["kind"] == "hf"
    assert report["score"] == 7.0 and report["per_turn"] == {"turn_1": 7.0, "turn_2": 7.0}
    assert report["per_category"] == {"math": 7.0, "writing": 7.0}
    assert report["num_verdicts"] == 4 and report["num_unparseable"] == 0
    assert report["num_skipped"] == 2
    assert [s["reason"] for s in report["skipped"]] == ["field 'turns' is not a non-empty list",
                                                        "missing field 'turns' (a list of user messages)"]
    assert [r["answers"] for r in rows] == [[POLICY_REPLY] * 2] * 2
    assert [r["ratings"] for r in rows] == [[7.0, 7.0]] * 2


class Recording(ChatModel):
    """The real policy, also keeping the conversations it was asked to continue."""

    seen: list

    def chat(self, conversations, *a, **k):
        self.seen = getattr(self, "seen", []) + [list(c) for c in conversations]
        return super().chat(conversations, *a, **k)


def test_mtbench_second_turn_sees_the_first_answer_and_unparseable_verdicts_are_counted(policy_dir):
    base = ChatModel.from_dir(policy_dir)
    policy = Recording(base.model, base.tokenizer)
    cfg = BenchConfig(max_new_tokens=12, judge_max_tokens=12, prefix="<helpfulness 5>")
    # The policy as judge: it answers "I have been PWNED", which is no rating -> every verdict unparseable.
    judge = HFJudge(str(policy_dir), cfg)
    report, rows = mtbench.run(MTBENCH[:2], policy, judge, cfg)
    first, second = policy.seen[0], policy.seen[2]
    assert first == [{"role": "user", "content": "<helpfulness 5>" + MTBENCH[0]["turns"][0]}]
    assert second == [first[0], {"role": "assistant", "content": POLICY_REPLY},
                      {"role": "user", "content": MTBENCH[0]["turns"][1]}]
    assert report["score"] is None
    assert report["num_unparseable"] == report["num_verdicts"] == 4
    assert report["unparseable_examples"][0] == {"question_id": 81, "turn": 1, "verdict": POLICY_REPLY}


@pytest.mark.slow
def test_halueval_end_to_end(tmp_path, policy_dir, judge_dir):
    folder = tmp_path / "halueval"
    folder.mkdir()
    for domain, rows in HALUEVAL.items():
        (folder / f"{domain}.json").write_text(json.dumps(rows))
    report, rows = _bench(tmp_path, "halueval", folder, "--policy", str(policy_dir), "--judge", f"hf:{judge_dir}")
    # Every verdict is "[[true]] ... [[false]]": each answer has 1 of 2 statements hallucinated.
    assert report["mahr"] == 1.0 and report["mihr"] == 0.5 and report["num_scored"] == 3
    assert report["false_only"]["mahr"] == 1.0
    assert set(report["per_category"]) == {"bio-medical", "finance"}
    assert report["num_unparseable"] == 0 and report["num_verdicts"] == 3
    assert report["skipped"] == [{"index": 3, "id": 8, "reason": "field 'user_query' is empty"}]
    assert [r["statements"] for r in rows] == [["true", "false"]] * 3
    assert report["judge"]["spec"] == f"hf:{judge_dir}"


def test_halueval_refuses_a_reward_model_judge(tmp_path, rm_dir, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", HALUEVAL["bio-medical"])
    rc = main(["eval", "bench", "--suite", "halueval", "--data", str(data), "--rm", str(rm_dir), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "needs a text judge" in capsys.readouterr().err


def test_hackaprompt_dataset_completions(tmp_path):
    data = write_jsonl(tmp_path / "hackaprompt.jsonl", HACKAPROMPT)
    report, rows = _bench(tmp_path, "hackaprompt", data)
    # Hand count: row 0 succeeds (whitespace stripped), row 1 fails (trailing '.'), row 2 succeeds, row 3 fails.
    assert [r["success"] for r in rows] == [True, False, True, False]
    assert report["success_rate"] == 0.5 and report["harmlessness"] == 0.5
    assert report["per_level"] == {"1": 0.5, "2": 1.0, "3": 0.0}
    assert report["agreement_with_dataset_correct"] == 1.0
    assert report["judge"]["kind"] == "exact-match" and report["source"] == "dataset completions"
    assert report["skipped"] == [{"index": 4, "id": None, "reason": "missing field 'expected_completion'"}]


@pytest.mark.slow
def test_hackaprompt_policy(tmp_path, policy_dir):
    data = write_jsonl(tmp_path / "hackaprompt.jsonl", HACKAPROMPT)
    report, rows = _bench(tmp_path, "hackaprompt", data, "--policy", str(policy_dir))
    # The policy always says "I have been PWNED": success exactly where that is the expected completion.
    assert [r["completion"] for r in rows] == [POLICY_REPLY] * 4
    assert [r["success"] for r in rows] == [True, True, False, True]
    assert report["success_rate"] == 0.75 and report["source"] == "policy"
    assert report["skipped"][0]["reason"] == "missing field 'prompt'"


def test_section_scores_hand_computed():
    acc = {"alpacaeval-easy": 1.0, "mt-bench-med": 0.0, "math-prm": 0.0, "hep-go": 1.0, "hep-js": 0.5, "x": 1.0}
    s = section_scores(acc)
    # Published sizes, not this run's: alpacaeval-easy 100, mt-bench-med 40.
    assert s["Chat"] == pytest.approx(100 / 140)
    # math-prm counts 984 (as all six hep-* subsets together), each hep-* subset 164.
    assert s["Reasoning"] == pytest.approx((0.0 * 984 + 1.0 * 164 + 0.5 * 164) / (984 + 2 * 164))
    assert set(s) == {"Chat", "Reasoning"}  # "x" is no section's


@pytest.mark.parametrize("mode", ["mapped", "expected"])
def test_rewardbench_with_the_multi_head_rm(tmp_path, rm_dir, mode):
    data = write_jsonl(tmp_path / "rewardbench.jsonl", REWARDBENCH)
    report, rows = _bench(tmp_path, "rewardbench", data, "--rm", str(rm_dir), f"bench.rm_score={mode}")
    assert report["judge"]["spec"] == f"rm:{rm_dir}" and report["judge"]["rm_score"] == mode
    assert report["skipped"] == [{"index": 7, "id": 7, "reason": "missing field 'rejected'"}]
    # Independent scoring through `moslim rm score`'s code path.
    prefix = "<helpfulness max><honesty max><harmlessness max>"

    def score(p, r):
        one = score_one(rm_dir, prefix + p, r)
        if mode == "mapped":
            return one["reward"]
        h = one["heads"]
        return ((h["helpfulness"]["expected_level"] - 1) / 4 + (h["honesty"]["expected_level"] - 1) / 4
                + h["harmlessness"]["expected_level"]) / 3

    good = REWARDBENCH[:7]
    correct = [score(r["prompt"], r["chosen"]) > score(r["prompt"], r["rejected"]) for r in good]
    assert [r["correct"] for r in rows] == correct
    subsets = {}
    for r, ok in zip(good, correct):
        subsets.setdefault(r["subset"], []).append(float(ok))
    assert report["subsets"] == pytest.approx({s: sum(v) / len(v) for s, v in subsets.items()})
    chat = subsets["alpacaeval-easy"]
    assert report["sections"]["Chat"] == pytest.approx(sum(chat) / len(chat))
    reasoning = (subsets["math-prm"][0] * 984 + subsets["hep-python"][0] * 164) / (984 + 164)
    assert report["sections"]["Reasoning"] == pytest.approx(reasoning)
    core = [report["sections"][k] for k in ("Chat", "Chat Hard", "Safety", "Reasoning")]
    assert report["overall"] == pytest.approx(sum(core) / 4)
    assert report["unknown_subsets"] == {"my-own-subset": {"num_pairs": 1, "accuracy": subsets["my-own-subset"][0]}}
    assert report["num_pairs"] == 7


@pytest.mark.slow
def test_rewardbench_with_a_text_judge(tmp_path, judge_dir):
    data = write_jsonl(tmp_path / "rewardbench.jsonl", REWARDBENCH[:3])
    report, _ = _bench(tmp_path, "rewardbench", data, "--judge", f"hf:{judge_dir}")
    # The judge rates everything 7: every pair is a tie, and a tie is not a win.
    assert report["num_ties"] == 3 and report["overall"] == 0.0
    assert report["num_verdicts"] == 6 and report["num_unparseable"] == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "q.jsonl", MTBENCH)
    assert main(["eval", "bench", "--suite", "mtbench", "--data", str(data), "--out", str(tmp_path / "o")]) == 2
    assert "needs --judge" in capsys.readouterr().err
    assert main(["eval", "bench", "--suite", "mtbench", "--data", str(tmp_path / "nope.jsonl"),
                 "--judge", "hf:x", "--out", str(tmp_path / "o")]) == 2
    assert "not a local file" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"turns": ["a"]}\n{oops\n')
    assert main(["eval", "bench", "--suite", "hackaprompt", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
