"""RM evaluation metrics: hand-computed small cases and brute-force pair enumeration."""

import itertools
import json
import math

import pytest
import torch

from moslim_mega.reward.metrics import (
    MetricError,
    confusion_matrix,
    expected_class,
    head_report,
    intensity_accuracy,
    majority_rate,
    mapping_accuracy,
    pairwise_accuracy,
    rm_report,
)


def test_expected_class():
    probs = torch.tensor([[0.1, 0.2, 0.7], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    torch.testing.assert_close(expected_class(probs), torch.tensor([1.6, 0.0, 1.5]))


def test_intensity_accuracy_ignores_unlabelled():
    pred, labels = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 2, 2, -1])
    assert intensity_accuracy(pred, labels) == pytest.approx(2 / 3)
    assert math.isnan(intensity_accuracy(pred, torch.full((4,), -1)))


def test_majority_rate():
    assert majority_rate(torch.tensor([1, 1, 0, -1, -1, 2])) == 0.5
    assert majority_rate(torch.tensor([3])) == 1.0
    assert math.isnan(majority_rate(torch.tensor([-1, -1])))


def test_confusion_matrix_rows_true_cols_pred():
    pred, labels = torch.tensor([0, 1, 2, 1, 0]), torch.tensor([0, 2, 2, -1, 1])
    assert confusion_matrix(pred, labels, 3) == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
    with pytest.raises(MetricError, match="pred_N"):
        confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)
    with pytest.raises(MetricError, match="labels_N"):
        confusion_matrix(torch.tensor([0]), torch.tensor([5]), 3)


def test_pairwise_accuracy_hand_computed():
    # group a: (0,1) right, (0,2) right, (1,2) wrong; idx 6 unlabelled is ignored.
    # group b: equal labels, no pair. group c: single. group d (interleaved): tie → 0.5.
    groups = ["a", "d", "a", "a", "b", "b", "c", "a", "d"]
    labels = torch.tensor([0, 0, 1, 2, 1, 1, 0, -1, 2])
    scores = torch.tensor([0.1, 1.0, 0.5, 0.3, 0.9, 0.2, 5.0, 100.0, 1.0])
    acc, n = pairwise_accuracy(scores, labels, groups)
    assert n == 4 and acc == pytest.approx((2 + 0.5) / 4)


def test_pairwise_accuracy_no_pairs_is_nan():
    acc, n = pairwise_accuracy(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1, 1, -1]), [0, 0, 0])
    assert n == 0 and math.isnan(acc)
    acc, n = pairwise_accuracy(torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), ["x", "y"])
    assert n == 0 and math.isnan(acc)
    with pytest.raises(MetricError, match="groups"):
        pairwise_accuracy(torch.tensor([0.1, 0.2]), torch.tensor([0, 1]), ["x"])


def test_mapping_accuracy_hand_computed():
    groups = ["g1", "g1", "g1", "g2", "g2"]
    labels = torch.tensor([0, 1, -1, 1, 0])
    rewards = torch.tensor([[1.0, 0.0], [0.5, 0.5], [9.0, 9.0], [0.2, 0.3], [0.2, 0.9]])
    # g1: target 0: 1.0 > 0.5 ✓; target 1: 0.5 > 0.0 ✓. g2: target 1: 0.3 < 0.9 ✗; target 0: tie ½
    acc, n = mapping_accuracy(rewards, labels, groups)
    assert n == 4 and acc == pytest.approx(2.5 / 4)
    acc, n = mapping_accuracy(rewards[:3], torch.tensor([0, 0, -1]), groups[:3])
    assert n == 0 and math.isnan(acc)


def _brute_force(scores, rewards, labels, groups):
    pair_ok = pair_n = map_ok = map_n = 0.0
    for a, b in itertools.combinations(range(len(groups)), 2):
        la, lb = int(labels[a]), int(labels[b])
        if groups[a] != groups[b] or la < 0 or lb < 0 or la == lb:
            continue
        hi, lo = (a, b) if la > lb else (b, a)
        pair_n += 1
        pair_ok += 1.0 if scores[hi] > scores[lo] else 0.5 if scores[hi] == scores[lo] else 0.0
        for win, lose, t in ((a, b, la), (b, a, lb)):
            map_n += 1
            x, y = rewards[win, t], rewards[lose, t]
            map_ok += 1.0 if x > y else 0.5 if x == y else 0.0
    return pair_ok / pair_n, int(pair_n), map_ok / map_n, int(map_n)


def test_pairwise_and_mapping_match_brute_force():
    g = torch.Generator().manual_seed(0)
    n = 300
    labels = torch.randint(-1, 4, (n,), generator=g)
    groups = [int(x) for x in torch.randint(0, 40, (n,), generator=g)]
    groups[:60] = ["big"] * 60  # one large group next to many small ones
    scores = torch.randint(0, 5, (n,), generator=g).float()  # coarse values → many ties
    rewards = torch.randint(0, 3, (n, 4), generator=g).float()
    want_pair, want_pn, want_map, want_mn = _brute_force(scores, rewards, labels, groups)
    assert pairwise_accuracy(scores, labels, groups) == (pytest.approx(want_pair), want_pn)
    assert mapping_accuracy(rewards, labels, groups) == (pytest.approx(want_map), want_mn)


def test_head_report_keys_and_values():
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.5, 0.5]])
    labels, groups = torch.tensor([0, 1, 1, -1]), [0, 0, 0, 0]
    rewards = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    rep = head_report(probs, labels, groups, rewards)
    assert rep["intensity_accuracy"] == pytest.approx(2 / 3)
    assert rep["majority_rate"] == pytest.approx(2 / 3)
    assert (rep["pairwise_accuracy"], rep["num_pairs"]) == (1.0, 2)  # E[c]: 0.2 < 0.7, 0.2 < 0.4
    assert rep["confusion"] == [[1, 0], [1, 1]]
    assert rep["num_labelled"] == 3
    assert rep["mapping_accuracy"] == 1.0
    assert "mapping_accuracy" not in head_report(probs, labels, groups)


def test_rm_report_shape_and_nan_ignoring_mean():
    probs = [torch.tensor([[0.9, 0.1], [0.2, 0.8]]), torch.tensor([[0.1, 0.7, 0.2], [0.3, 0.4, 0.3]])]
    labels = torch.tensor([[0, 1], [1, 1]])  # head "b": equal labels → pairwise nan
    rewards = [torch.zeros(2, 2), torch.zeros(2, 3)]
    rep = rm_report(probs, labels, ["p", "p"], ["a", "b"], rewards)
    assert set(rep) == {"heads", "mean"} and set(rep["heads"]) == {"a", "b"}
    assert set(rep["heads"]["a"]) == {
        "intensity_accuracy", "majority_rate", "pairwise_accuracy", "num_pairs", "confusion",
        "num_labelled", "mapping_accuracy",
    }
    assert math.isnan(rep["heads"]["b"]["pairwise_accuracy"])
    assert rep["mean"]["pairwise_accuracy"] == rep["heads"]["a"]["pairwise_accuracy"] == 1.0
    assert rep["mean"]["intensity_accuracy"] == pytest.approx((1.0 + 1.0) / 2)
    assert rep["mean"]["majority_rate"] == pytest.approx((0.5 + 1.0) / 2)
    assert rep["mean"]["mapping_accuracy"] == 0.5  # all-zero rewards tie
    assert "mapping_accuracy" not in rm_report(probs, labels, ["p", "p"], ["a", "b"])["mean"]
    json.loads(json.dumps(rep))  # plain python types only
    with pytest.raises(MetricError, match="labels_NH"):
        rm_report(probs, labels[:, :1], ["p", "p"], ["a", "b"])
