"""RewardBench sections and overall, checked against the rewardbench package's own aggregation
(restated in rewardbench_reference.py, rewardbench 0.1.4) on a synthetic per-subset table."""

import pytest
from rewardbench_reference import PRIOR, PUBLISHED, leaderboard_average, per_section

from moslim_mega.bench import rewardbench
from moslim_mega.bench.judges import RMJudge
from moslim_mega.config import BenchConfig

SCORE = {"win": 1.0, "lose": 0.0, "mid": 0.5}


class TableJudge(RMJudge):
    """An RM-kind scorer that reads the score off the response text (no model)."""

    def __init__(self):  # deliberately no RM: the scores are the table's
        pass

    def score(self, prompts, responses):
        return [SCORE[r] for r in responses]


def synthetic_records(subsets):
    """Per subset i: n = 1..5 pairs (not proportional to the published counts), k of them won."""
    records, expected = [], {}
    for i, subset in enumerate(subsets):
        n = 1 + (7 * i) % 5
        k = (3 * i) % (n + 1)
        expected[subset] = k / n
        for j in range(n):
            records.append({"prompt": f"p{i}.{j}", "chosen": "win" if j < k else "lose", "rejected": "mid",
                            "subset": subset, "id": f"{subset}/{j}"})
    return records, expected


def run(records):
    return rewardbench.run(records, None, TableJudge(), BenchConfig())[0]


def test_sections_and_overall_match_the_rewardbench_package():
    records, acc = synthetic_records([s for _, s, _ in PUBLISHED])
    report = run(records)
    assert report["subsets"] == pytest.approx(acc)
    # The package weighs by its published counts, not by how many pairs this run scored.
    assert report["sections"] == pytest.approx(per_section(acc))
    assert report["overall"] == pytest.approx(leaderboard_average(acc))
    assert report["missing_sections"] == [] and report["unknown_subsets"] == {}


def test_prior_sets_weigh_half_a_section():
    records, acc = synthetic_records([s for _, s, _ in PUBLISHED] + PRIOR[:3])
    report = run(records)
    assert report["sections"]["Prior Sets (0.5 weight)"] == pytest.approx(sum(acc[s] for s in PRIOR[:3]) / 3)
    assert report["overall"] == pytest.approx(leaderboard_average(acc))
    assert report["overall"] != pytest.approx(leaderboard_average({s: acc[s] for s in acc if s not in PRIOR}))


def test_math_prm_weighs_as_all_code_subsets_even_when_some_are_absent():
    records, acc = synthetic_records(["math-prm", "hep-go", "hep-rust"])
    report = run(records)
    expected = (acc["math-prm"] * 984 + (acc["hep-go"] + acc["hep-rust"]) * 164) / (984 + 2 * 164)
    assert report["sections"] == pytest.approx({"Reasoning": expected})
    assert report["sections"]["Reasoning"] == pytest.approx(per_section(acc)["Reasoning"])
    # A section with no subset is reported missing (the package would score it 0), not averaged in.
    assert report["missing_sections"] == ["Chat", "Chat Hard", "Safety"]
    assert report["overall"] == pytest.approx(expected)


def test_unknown_subsets_are_reported_not_dropped():
    records, acc = synthetic_records(["alpacaeval-easy", "my-own-subset", "hep-go"])
    report = run(records)
    assert report["unknown_subsets"] == {"my-own-subset": {"num_pairs": 3, "accuracy": pytest.approx(acc["my-own-subset"])}}
    assert set(report["sections"]) == {"Chat", "Reasoning"}
    assert report["overall"] == pytest.approx((acc["alpacaeval-easy"] + acc["hep-go"]) / 2)
    assert report["num_scored_pairs"] == len(records)
