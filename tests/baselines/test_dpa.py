"""DPA: directions, the rejection step (argmax vᵀr), replay share, the regression RM."""

import pytest
import torch

from moslim_mega.baselines.common import BaselineError
from moslim_mega.baselines.dpa import direction_text, replay_count, sample_directions, select_best, unit_direction
from moslim_mega.baselines.regression_rm import masked_mse, regression_targets


def test_rejection_keeps_the_argmax_of_v_dot_r():
    gen = torch.Generator().manual_seed(0)
    r_GND = torch.rand(50, 8, 3, generator=gen)
    v_GD = sample_directions(50, 3, gen)
    idx = select_best(r_GND, v_GD)
    for g in range(50):
        scores = [sum(float(v_GD[g, d]) * float(r_GND[g, n, d]) for d in range(3)) for n in range(8)]
        assert idx[g] == max(range(8), key=lambda n: scores[n])


def test_rejection_follows_the_direction_not_the_sum():
    r_GND = torch.tensor([[[0.9, 0.0], [0.0, 0.8], [0.5, 0.5]]]).repeat(3, 1, 1)
    v_GD = torch.stack([unit_direction([1, 0]), unit_direction([0, 1]), unit_direction([1, 1])])
    assert select_best(r_GND, v_GD).tolist() == [0, 1, 2]


def test_directions_are_non_negative_unit_vectors():
    v = sample_directions(1000, 3, torch.Generator().manual_seed(1))
    torch.testing.assert_close(v.norm(dim=1), torch.ones(1000))
    assert bool((v >= 0).all())
    assert v.mean(0).min() > 0.4  # every dimension gets weight, none is favoured
    assert direction_text(unit_direction([1, 1, 0]), ("helpfulness", "honesty", "harmlessness")) == \
        "helpfulness 6 honesty 6 harmlessness 0"
    with pytest.raises(BaselineError, match="no length"):
        unit_direction([0, 0, 0])


def test_replay_is_the_requested_share():
    n = replay_count(850, 0.15)
    assert n == 150 and abs(n / (850 + n) - 0.15) < 1e-9
    assert replay_count(100, 0.0) == 0
    with pytest.raises(BaselineError, match="dpa_replay_fraction"):
        replay_count(10, 1.0)


def test_regression_targets_and_masked_mse():
    labels = torch.tensor([[4, 0, 1], [2, -1, 0]])
    y, m = regression_targets(labels, (5, 5, 2))
    torch.testing.assert_close(y, torch.tensor([[1.0, 0.0, 1.0], [0.5, 0.0, 0.0]]))
    assert m.tolist() == [[1, 1, 1], [1, 0, 1]]
    pred = y.clone()
    pred[1, 1] = 9.0  # unlabelled: no loss
    assert float(masked_mse(pred, y, m)) == 0.0
    pred[0, 0] = 0.0
    assert float(masked_mse(pred, y, m)) == pytest.approx(1.0 / 5)
