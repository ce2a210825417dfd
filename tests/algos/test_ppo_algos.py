import copy
import math

import pytest
import torch

from moslim_mega.algos.core import AlgoError, masked_mean
from moslim_mega.algos.ppo import (
    entropy_bonus,
    gae_advantages,
    ppo_policy_loss,
    ppo_value_loss,
    token_level_rewards,
)

NAN = float("nan")
D64 = torch.float64


def test_token_level_rewards_put_the_score_at_the_last_valid_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.9], [0.5, 0.6, 0.7, 0.8, 0.9]], dtype=D64)
    mask = torch.tensor([[0, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    r = token_level_rewards(torch.tensor([1.0, 2.0], dtype=D64), kl, mask, kl_coef=0.5)
    expect = torch.tensor([[0, -0.1, -0.15 + 1.0, 0, 0], [-0.25, -0.3, -0.35, -0.4, -0.45 + 2.0]], dtype=D64)
    torch.testing.assert_close(r, expect)


def test_token_level_rewards_reject_a_row_without_valid_tokens():
    with pytest.raises(AlgoError, match=r"mask_BT: rows \[1\]"):
        token_level_rewards(torch.ones(2), torch.zeros(2, 3), torch.tensor([[1, 1, 0], [0, 0, 0]]), 0.1)
    with pytest.raises(AlgoError, match="score_B"):
        token_level_rewards(torch.ones(3), torch.zeros(2, 3), torch.ones(2, 3), 0.1)


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_values():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 6, generator=g, dtype=D64)
    values = torch.randn(3, 6, generator=g, dtype=D64)
    mask = torch.ones(3, 6)
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = rewards.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(adv, to_go - values)
    torch.testing.assert_close(ret, to_go)  # returns = adv + values


def test_gae_on_a_row_whose_mask_starts_at_column_2_hand_computed():
    gamma, lam = 0.9, 0.8
    r2, r3, r4 = 0.1, -0.2, 1.5
    v2, v3, v4 = 0.3, 0.4, 0.6
    # NaN in the prompt / padding columns must not leak into the result.
    rewards = torch.tensor([[NAN, NAN, r2, r3, r4, NAN]], dtype=D64)
    values = torch.tensor([[NAN, 7.0, v2, v3, v4, NAN]], dtype=D64)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma, lam)
    d4 = r4 - v4  # the value after the last response token is 0
    d3 = r3 + gamma * v4 - v3
    d2 = r2 + gamma * v3 - v2
    a4 = d4
    a3 = d3 + gamma * lam * a4
    a2 = d2 + gamma * lam * a3
    torch.testing.assert_close(adv, torch.tensor([[0, 0, a2, a3, a4, 0]], dtype=D64))
    torch.testing.assert_close(ret, torch.tensor([[0, 0, a2 + v2, a3 + v3, a4 + v4, 0]], dtype=D64))


def test_gae_does_not_depend_on_where_the_response_sits_in_the_row():
    g = torch.Generator().manual_seed(1)
    r, v = torch.randn(4, generator=g, dtype=D64), torch.randn(4, generator=g, dtype=D64)
    rewards = torch.zeros(2, 8, dtype=D64)
    values = torch.full((2, 8), 5.0, dtype=D64)
    mask = torch.zeros(2, 8)
    rewards[0, 0:4], values[0, 0:4], mask[0, 0:4] = r, v, 1  # right-padded
    rewards[1, 3:7], values[1, 3:7], mask[1, 3:7] = r, v, 1  # prompt first, then response, then pad
    adv, _ = gae_advantages(rewards, values, mask, gamma=0.95, lam=0.9)
    torch.testing.assert_close(adv[0, 0:4], adv[1, 3:7])
    assert adv[mask == 0].abs().sum() == 0


def _linear_policy_batch(seed=0):
    """Tiny softmax policy logits = W x over 4 actions; B=2 rows of T=3 tokens, last token of row 1 masked."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(4, 5, generator=g, dtype=D64, requires_grad=True)
    x_BTD = torch.randn(2, 3, 5, generator=g, dtype=D64)
    actions_BT = torch.randint(0, 4, (2, 3), generator=g)
    adv_BT = torch.randn(2, 3, generator=g, dtype=D64)
    mask_BT = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return W, x_BTD, actions_BT, adv_BT, mask_BT


def _logp(W, x_BTD, actions_BT):
    return torch.log_softmax(x_BTD @ W.T, dim=-1).gather(-1, actions_BT[..., None]).squeeze(-1)


def test_ppo_with_infinite_clip_and_one_update_equals_the_policy_gradient_update():
    W, x, a, adv, mask = _linear_policy_batch()
    logp = _logp(W, x, a)
    ppo_loss, stats = ppo_policy_loss(logp, logp.detach(), adv, mask, clip_range=float("inf"))
    (g_ppo,) = torch.autograd.grad(ppo_loss, W)
    pg_loss = -masked_mean(adv * _logp(W, x, a), mask)  # REINFORCE surrogate
    (g_pg,) = torch.autograd.grad(pg_loss, W)
    torch.testing.assert_close(g_ppo, g_pg, rtol=0, atol=1e-15)
    assert g_pg.abs().sum() > 0
    assert stats["clipfrac"] == 0.0 and stats["approx_kl"] == 0.0 and stats["ratio_mean"] == 1.0
    # One SGD step with each loss from the same start lands on the same parameters.
    W_ppo, W_pg = copy.deepcopy(W.detach()).requires_grad_(), copy.deepcopy(W.detach()).requires_grad_()
    opt_ppo, opt_pg = torch.optim.SGD([W_ppo], lr=0.5), torch.optim.SGD([W_pg], lr=0.5)
    lp = _logp(W_ppo, x, a)
    ppo_policy_loss(lp, lp.detach(), adv, mask, float("inf"))[0].backward()
    (-masked_mean(adv * _logp(W_pg, x, a), mask)).backward()
    opt_ppo.step()
    opt_pg.step()
    torch.testing.assert_close(W_ppo, W_pg, rtol=0, atol=1e-15)
    assert not torch.allclose(W_ppo, W.detach())


def test_finite_clip_gives_zero_gradient_exactly_on_the_clipped_entries():
    eps = 0.2
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1, 0.9]], dtype=D64)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0, -3.0]], dtype=D64)
    # Clipped: A>0 & ρ>1+ε, A<0 & ρ<1−ε. The pessimistic min keeps A>0 & ρ<1−ε and A<0 & ρ>1+ε unclipped.
    clipped = torch.tensor([[True, True, False, False, False, False]])
    old_logp = torch.log(torch.tensor([[0.3, 0.2, 0.1, 0.4, 0.25, 0.5]], dtype=D64))
    logp = (old_logp + ratio.log()).requires_grad_()
    mask = torch.ones(1, 6)
    loss, stats = ppo_policy_loss(logp, old_logp, adv, mask, clip_range=eps)
    loss.backward()
    assert torch.all(logp.grad[clipped] == 0)
    # Unclipped entries: d(−A·ρ)/dlogp = −A·ρ, divided by the 6 tokens of the token-mean.
    torch.testing.assert_close(logp.grad[~clipped], (-adv * ratio / 6)[~clipped])
    expect_loss = (-1.0 * 1.2 + -1.0 * -0.8 + -1.0 * 0.5 + 1.0 * 1.5 - 2.0 * 1.1 + 3.0 * 0.9) / 6
    assert loss.item() == pytest.approx(expect_loss)
    assert stats["clipfrac"] == pytest.approx(2 / 6)
    assert stats["ratio_mean"] == pytest.approx(ratio.mean().item())
    assert stats["approx_kl"] == pytest.approx((0.5 * ratio.log() ** 2).mean().item())


def test_policy_loss_ignores_masked_tokens_and_rejects_bad_clip():
    logp = torch.tensor([[-1.0, -2.0, -50.0]])
    adv = torch.tensor([[1.0, 2.0, 1e9]])
    mask = torch.tensor([[1, 1, 0]])
    loss, _ = ppo_policy_loss(logp, logp, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-1.5)
    with pytest.raises(AlgoError, match="clip_range"):
        ppo_policy_loss(logp, logp, adv, mask, 0.0)


def test_value_loss_hand_case_clipped_and_plain():
    values = torch.tensor([[1.0, 2.0, 3.0, 9.0]], dtype=D64)
    old = torch.tensor([[1.0, 1.0, 3.5, 0.0]], dtype=D64)
    returns = torch.tensor([[2.0, 0.0, 3.0, 0.0]], dtype=D64)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_value_loss(values, old, returns, mask, clip_range=0.2)
    # per token: max(1, 1) = 1; max(4, 1.2² = 1.44) = 4; max(0, (3.3 − 3)² = 0.09) = 0.09 (clipped branch)
    assert loss.item() == pytest.approx(0.5 * (1 + 4 + 0.09) / 3)
    assert stats["vf_clipfrac"] == pytest.approx(1 / 3)
    for no_clip in (0.0, math.inf):
        loss, stats = ppo_value_loss(values, old, returns, mask, clip_range=no_clip)
        assert loss.item() == pytest.approx(0.5 * (1 + 4 + 0) / 3)
        assert stats["vf_clipfrac"] == 0.0
    with pytest.raises(AlgoError, match="clip_range"):
        ppo_value_loss(values, old, returns, mask, clip_range=-0.1)


def test_entropy_bonus_is_the_masked_token_mean():
    ent = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert entropy_bonus(ent, mask).item() == pytest.approx(2.0)
