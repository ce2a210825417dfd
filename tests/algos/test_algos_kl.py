import math

import pytest
import torch

from moslim_mega.algos.core import AlgoError
from moslim_mega.algos.kl import AdaptiveKLController, FixedKLController, kl_penalty


def test_three_estimators_on_hand_values():
    logp = torch.tensor([-1.0, -2.0], dtype=torch.float64)
    ref = torch.tensor([-1.5, -1.0], dtype=torch.float64)
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    assert kl_penalty(logp, ref, "k2").tolist() == pytest.approx([0.125, 0.5])
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1 - 1])


def test_k2_k3_are_nonnegative_and_k3_is_zero_at_equal_logprobs():
    g = torch.Generator().manual_seed(0)
    logp = -5 * torch.rand(1000, generator=g)
    ref = -5 * torch.rand(1000, generator=g)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, ref, "k2") >= 0).all()
    assert torch.equal(kl_penalty(logp, logp, "k3"), torch.zeros(1000))


def test_k1_and_k3_sample_means_match_the_true_kl_of_two_categoricals():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    true_kl = float((p * (p / q).log()).sum())  # ≈ 0.2749
    g = torch.Generator().manual_seed(0)
    samples = torch.multinomial(p, 400_000, replacement=True, generator=g)
    logp, ref = p.log()[samples], q.log()[samples]
    assert kl_penalty(logp, ref, "k1").mean().item() == pytest.approx(true_kl, abs=5e-3)
    assert kl_penalty(logp, ref, "k3").mean().item() == pytest.approx(true_kl, abs=5e-3)


def test_unknown_estimator_raises():
    with pytest.raises(AlgoError, match="estimator"):
        kl_penalty(torch.zeros(2), torch.zeros(2), "k4")
    with pytest.raises(AlgoError, match="ref_logp_BT"):
        kl_penalty(torch.zeros(2), torch.zeros(3), "k1")


def test_adaptive_controller_moves_towards_target_with_clipped_proportional_error():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000)
    ctl.update(current_kl=12.0, n_samples=256)  # error 1.0 clipped to 0.2 → increase
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    before = ctl.value
    ctl.update(current_kl=6.6, n_samples=100)  # error 0.1, inside the clip
    assert ctl.value == pytest.approx(before * (1 + 0.1 * 100 / 10_000))
    before = ctl.value
    ctl.update(current_kl=1.0, n_samples=256)  # KL below target → decrease, error clipped to −0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 256 / 10_000))
    assert ctl.value < before
    before = ctl.value
    ctl.update(current_kl=6.0, n_samples=256)  # on target → unchanged
    assert ctl.value == before


def test_fixed_controller_is_constant_and_bad_arguments_raise():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 64)
    assert ctl.value == 0.05
    with pytest.raises(AlgoError, match="coef"):
        FixedKLController(-1.0)
    with pytest.raises(AlgoError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
    with pytest.raises(AlgoError, match="horizon"):
        AdaptiveKLController(0.1, target=1.0, horizon=0)
