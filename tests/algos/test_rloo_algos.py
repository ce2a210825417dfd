import pytest
import torch

from moslim_mega.algos.core import AlgoError
from moslim_mega.algos.rloo import rloo_advantages, sequence_kl_rewards


def test_rloo_hand_case_leave_one_out_baseline():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 4.0]], dtype=torch.float64)
    adv = rloo_advantages(rewards)
    expect = torch.tensor(
        [[1 - 11 / 3, 2 - 10 / 3, 3 - 3, 6 - 2], [0 - 4 / 3, 0 - 4 / 3, 0 - 4 / 3, 4 - 0]], dtype=torch.float64
    )
    torch.testing.assert_close(adv, expect)
    # Leave-one-out advantages of a prompt sum to zero: K/(K−1)·Σ(r − mean) = 0.
    torch.testing.assert_close(adv.sum(1), torch.zeros(2, dtype=torch.float64))


def test_rloo_two_samples_and_the_k_below_two_error():
    torch.testing.assert_close(rloo_advantages(torch.tensor([[1.0, 4.0]])), torch.tensor([[-3.0, 3.0]]))
    with pytest.raises(AlgoError, match="RLOO needs samples_per_prompt >= 2"):
        rloo_advantages(torch.tensor([[1.0], [2.0]]))
    with pytest.raises(AlgoError, match="rewards_BK"):
        rloo_advantages(torch.tensor([1.0, 2.0]))


def test_sequence_kl_rewards_fold_the_summed_kl_into_the_score():
    score = torch.tensor([1.0, -2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 5.0], [0.5, 0.5, 9.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])
    out = sequence_kl_rewards(score, kl, mask, kl_coef=0.5)
    torch.testing.assert_close(out, torch.tensor([1.0 - 0.5 * 0.5, -2.0 - 0.5 * 1.0]))
