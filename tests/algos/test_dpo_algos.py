import math

import pytest
import torch

from moslim_mega.algos.core import AlgoError
from moslim_mega.algos.dpo import dpo_loss, select_pairs

D64 = torch.float64
# Two pairs of hand-made SEQUENCE log-probs.
PI_C, PI_R, REF_C, REF_R = [-10.0, -20.0], [-12.0, -18.0], [-11.0, -21.0], [-11.5, -20.0]
BETA = 0.1


def _t(xs, grad=False):
    return torch.tensor(xs, dtype=D64, requires_grad=grad)


def _margins():
    return [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PI_C, PI_R, REF_C, REF_R)]


def test_dpo_sigmoid_loss_equals_a_direct_evaluation_by_hand():
    h = _margins()  # [1.5, -1.0]
    assert h == [1.5, -1.0]
    by_hand = sum(-math.log(1.0 / (1.0 + math.exp(-BETA * m))) for m in h) / 2
    loss, stats = dpo_loss(_t(PI_C), _t(PI_R), _t(REF_C), _t(REF_R), BETA)
    assert loss.item() == pytest.approx(by_hand, rel=1e-12)
    assert stats["reward_margin"] == pytest.approx(BETA * (1.5 - 1.0) / 2)
    assert stats["reward_accuracy"] == 0.5
    assert stats["chosen_reward"] == pytest.approx(BETA * ((-10 + 11) + (-20 + 21)) / 2)
    assert stats["rejected_reward"] == pytest.approx(BETA * ((-12 + 11.5) + (-18 + 20)) / 2)


def test_dpo_gradient_raises_chosen_and_lowers_rejected_logprob():
    pi_c, pi_r = _t(PI_C, grad=True), _t(PI_R, grad=True)
    loss, _ = dpo_loss(pi_c, pi_r, _t(REF_C), _t(REF_R), BETA)
    loss.backward()
    # d/dπ_c of −log σ(βh) = −β·σ(−βh) / 2 (mean over 2 pairs); the rejected gradient is its negative.
    expect = [-BETA / (1 + math.exp(BETA * m)) / 2 for m in _margins()]
    assert pi_c.grad.tolist() == pytest.approx(expect)
    assert pi_r.grad.tolist() == pytest.approx([-e for e in expect])


def test_ipo_loss_hand_case():
    by_hand = sum((m - 1 / (2 * BETA)) ** 2 for m in _margins()) / 2  # ((1.5 − 5)² + (−1 − 5)²) / 2
    assert by_hand == pytest.approx((12.25 + 36.0) / 2)
    loss, _ = dpo_loss(_t(PI_C), _t(PI_R), _t(REF_C), _t(REF_R), BETA, kind="ipo")
    assert loss.item() == pytest.approx(by_hand)


def test_dpo_rejects_unknown_kind_and_bad_beta():
    args = (_t(PI_C), _t(PI_R), _t(REF_C), _t(REF_R))
    with pytest.raises(AlgoError, match="kind"):
        dpo_loss(*args, BETA, kind="hinge2")
    with pytest.raises(AlgoError, match="beta"):
        dpo_loss(*args, 0.0)


def test_select_pairs_with_ties():
    rewards = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0], [5.0, 1.0, 1.0, 5.0], [0.0, -1.0, 0.5, 0.2]])
    chosen, rejected, valid = select_pairs(rewards)
    assert chosen.tolist()[0] in (1, 2) and rejected.tolist()[0] == 3
    assert valid.tolist() == [True, False, True, True]
    assert rewards[2, chosen[2]] == 5.0 and rewards[2, rejected[2]] == 1.0
    assert chosen.tolist()[3] == 2 and rejected.tolist()[3] == 1
    assert bool((rewards.gather(1, chosen[:, None]) >= rewards.gather(1, rejected[:, None])).all())
    with pytest.raises(AlgoError, match="samples_per_prompt"):
        select_pairs(torch.tensor([[1.0], [2.0]]))
