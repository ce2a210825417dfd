"""Truncated importance weights and the mismatch statistics against hand computations."""

import math

import pytest
import torch

from moslim_mega.algos import ppo
from moslim_mega.algos.core import AlgoError
from moslim_mega.algos.rollout_correction import (logprob_mismatch, seq_tis_weights_B, tis_weights_BT,
                                                  token_tis_weights_BT)

# Two rows; row 0 has response tokens at columns 1-2, row 1 at columns 1-3 (column 0 is prompt).
MASK_BT = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float32)
OLD_BT = torch.log(torch.tensor([[0.9, 0.5, 0.2, 0.3], [0.9, 0.4, 0.8, 0.1]]))
ROLL_BT = torch.log(torch.tensor([[0.1, 0.25, 0.4, 0.3], [0.2, 0.1, 0.8, 0.2]]))
# ratios π_old/π_rollout on the response tokens: row 0: 2.0, 0.5; row 1: 4.0, 1.0, 0.5


def test_token_tis_is_the_capped_ratio_per_token():
    w_BT, stats = token_tis_weights_BT(OLD_BT, ROLL_BT, MASK_BT, cap=3.0)
    want = torch.tensor([[0, 2.0, 0.5, 0], [0, 3.0, 1.0, 0.5]])  # 4.0 capped at 3; prompt/pad columns 0
    assert torch.allclose(w_BT, want, atol=1e-6)
    assert stats["tis_weight_mean"] == pytest.approx((2 + 0.5 + 3 + 1 + 0.5) / 5, abs=1e-6)
    assert stats["tis_capped_frac"] == pytest.approx(1 / 5)


def test_seq_tis_is_the_capped_product_per_sequence():
    w_B, stats = seq_tis_weights_B(OLD_BT, ROLL_BT, MASK_BT, cap=1.5)
    # row 0: 2.0 · 0.5 = 1.0; row 1: 4.0 · 1.0 · 0.5 = 2.0 → capped at 1.5
    assert torch.allclose(w_B, torch.tensor([1.0, 1.5]), atol=1e-6)
    assert stats == pytest.approx({"tis_weight_mean": 1.25, "tis_capped_frac": 0.5})
    w_BT, _ = tis_weights_BT("seq_tis", OLD_BT, ROLL_BT, MASK_BT, 1.5)
    assert torch.allclose(w_BT, torch.tensor([[0, 1.0, 1.0, 0], [0, 1.5, 1.5, 1.5]]), atol=1e-6)


def test_huge_ratios_do_not_overflow():
    old, roll = torch.zeros(1, 3), torch.full((1, 3), -200.0)  # ratio e^200 per token, e^600 per sequence
    w_BT, _ = token_tis_weights_BT(old, roll, torch.ones(1, 3), cap=2.0)
    w_B, _ = seq_tis_weights_B(old, roll, torch.ones(1, 3), cap=2.0)
    assert torch.equal(w_BT, torch.full((1, 3), 2.0)) and torch.equal(w_B, torch.tensor([2.0]))


def test_none_gives_no_weights_and_bad_modes_or_caps_are_named():
    assert tis_weights_BT("none", OLD_BT, ROLL_BT, MASK_BT, 2.0) == (None, {})
    with pytest.raises(AlgoError, match="policy.rollout_correction"):
        tis_weights_BT("tis", OLD_BT, ROLL_BT, MASK_BT, 2.0)
    with pytest.raises(AlgoError, match="policy.rollout_correction_cap"):
        token_tis_weights_BT(OLD_BT, ROLL_BT, MASK_BT, 0.0)


def test_weights_multiply_each_tokens_clipped_surrogate_term():
    g = torch.Generator().manual_seed(0)
    logp = torch.randn(2, 4, generator=g) * 0.1 + OLD_BT
    adv = torch.randn(2, 4, generator=g)
    w_BT, _ = token_tis_weights_BT(OLD_BT, ROLL_BT, MASK_BT, cap=3.0)
    loss, _ = ppo.ppo_policy_loss(logp, OLD_BT, adv, MASK_BT, 0.2, w_BT)
    ratio = torch.exp(logp - OLD_BT)
    per_token = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2))
    want = (per_token * w_BT * MASK_BT).sum() / MASK_BT.sum()
    assert torch.allclose(loss, want, atol=1e-6)
    plain, _ = ppo.ppo_policy_loss(logp, OLD_BT, adv, MASK_BT, 0.2)
    ones, _ = ppo.ppo_policy_loss(logp, OLD_BT, adv, MASK_BT, 0.2, torch.ones(2, 4))
    assert torch.equal(plain, ones)


def test_mismatch_statistics_by_hand():
    s = logprob_mismatch(OLD_BT, ROLL_BT, MASK_BT)
    d = [math.log(r) for r in (2.0, 0.5, 4.0, 1.0, 0.5)]  # trainer − rollout on the response tokens
    assert float(s["abs_diff_mean"]) == pytest.approx(sum(map(abs, d)) / 5, rel=1e-6)
    assert float(s["abs_diff_max"]) == pytest.approx(math.log(4.0), rel=1e-6)
    assert float(s["mismatch_kl"]) == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 5, rel=1e-6)
    same = logprob_mismatch(OLD_BT, OLD_BT, MASK_BT)
    assert float(same["abs_diff_max"]) == 0 and float(same["mismatch_kl"]) == 0
