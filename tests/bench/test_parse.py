import pytest

from moslim_mega.bench.common import unparseable_report
from moslim_mega.bench.halueval import hallucination_rates
from moslim_mega.bench.parse import parse_rating, parse_statement_verdicts


@pytest.mark.parametrize(
    "text, want",
    [
        ("The answer is fine. [[7]]", 7.0),
        ("Rating: [[ 8.5 ]]", 8.5),
        ("[[3]] but later [[9]]", 3.0),  # the first bracketed grade wins
        ("Rating: 7", 7.0),
        ("**Score:** 4", 4.0),
        ("score = 10", 10.0),
        ("I'd give it 6/10.", 6.0),
        ("6 / 10 overall", 6.0),
        ("[[10]]", 10.0),
        ("[[1]]", 1.0),
    ],
)
def test_rating_formats(text, want):
    assert parse_rating(text) == want


@pytest.mark.parametrize(
    "text",
    ["", "no grade here", "[[0]]", "[[11]]", "Rating: 42", "[[seven]]", "rated 7 out of ten", None, 7],
)
def test_unparseable_ratings_are_none_not_clipped(text):
    assert parse_rating(text) is None


def test_bracket_beats_later_plain_rating():
    assert parse_rating("Rating: 2 ... final [[9]]") == 9.0


def test_statement_verdicts():
    text = "Insulin lowers blood sugar. [[true]]\nIt is made in the liver. [[FALSE]]\nDiscovered 1921 [[ unknown ]]"
    assert parse_statement_verdicts(text) == ["true", "false", "unknown"]
    assert parse_statement_verdicts("[[none]]") == []
    assert parse_statement_verdicts("No tags at all") is None
    assert parse_statement_verdicts("[[none]] and [[true]]") is None  # contradictory
    assert parse_statement_verdicts(None) is None


def test_hallucination_rates_hand_computed():
    lists = [["true", "false"], ["true", "true", "true"], ["unknown"], []]  # [] = no statements: left out
    r = hallucination_rates(lists)
    assert r["num_scored"] == 3
    assert r["mahr"] == pytest.approx(2 / 3)
    assert r["mihr"] == pytest.approx((1 / 2 + 0 + 1) / 3)
    f = hallucination_rates(lists, bad=("false",))
    assert f["mahr"] == pytest.approx(1 / 3) and f["mihr"] == pytest.approx((1 / 2) / 3)
    assert hallucination_rates([[]])["mahr"] is None


def test_unparseable_report_counts_all_but_shows_five():
    ex = [{"i": i} for i in range(8)]
    r = unparseable_report(ex, 20)
    assert r["num_unparseable"] == 8 and r["num_verdicts"] == 20 and len(r["unparseable_examples"]) == 5
