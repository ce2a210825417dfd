import math

import pytest
import torch
import torch.nn.functional as F

from moslim_mega.reward.losses import balanced_class_weights, paper_eq10_loss, per_head_ce_loss

K = (5, 5, 2)


def _logits(B=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, k, generator=g, requires_grad=True) for k in K]


def test_per_head_ce_equals_sum_of_per_head_cross_entropy():
    logits = _logits()
    labels = torch.tensor([[0, 4, 1], [1, 3, 0], [2, 2, 1], [3, 1, 0], [4, 0, 1], [0, 0, 0]])
    total, per_head = per_head_ce_loss(logits, labels)
    expect = [F.cross_entropy(logits[i], labels[:, i]) for i in range(3)]
    for got, want in zip(per_head, expect):
        assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(total, sum(expect), atol=1e-6)


def test_unlabelled_entries_are_masked_and_an_empty_head_gives_zero():
    logits = _logits()
    labels = torch.tensor([[0, -1, -1], [1, 3, -1], [2, -1, -1], [3, 1, -1], [4, 0, -1], [-1, 0, -1]])
    total, per_head = per_head_ce_loss(logits, labels)
    assert per_head[2].item() == 0.0 and torch.isfinite(total)
    want0 = F.cross_entropy(logits[0][:5], labels[:5, 0])
    assert torch.allclose(per_head[0], want0, atol=1e-6)
    total.backward()
    # The masked row 5 of head 0 and all of head 2 receive no gradient.
    assert torch.all(logits[0].grad[5] == 0)
    assert torch.all(logits[2].grad == 0)
    assert logits[1].grad[0].abs().sum() == 0 and logits[1].grad[1].abs().sum() > 0


def test_class_weights_follow_inverse_frequency():
    labels = torch.tensor([[0], [0], [0], [1], [-1]])
    (w,) = balanced_class_weights(labels, (3,))
    # N=4 labelled, K=3: class 0 → 4/(3·3), class 1 → 4/(3·1), class 2 unseen → 1
    assert torch.allclose(w, torch.tensor([4 / 9, 4 / 3, 1.0]))
    logits = [torch.randn(4, 3)]
    _, (weighted,) = per_head_ce_loss(logits, labels[:4], [w])
    assert torch.allclose(weighted, F.cross_entropy(logits[0], labels[:4, 0], weight=w))


def test_paper_eq10_matches_a_direct_evaluation():
    logits = _logits(B=3, seed=1)
    labels = torch.tensor([[0, 4, 1], [2, -1, 0], [1, 1, -1]])
    total, _ = paper_eq10_loss(logits, labels)
    want = 0.0
    for b in range(3):
        # q_j = Σ_i exp(z_ij) / Σ_i Σ_k exp(z_ik); heads with fewer classes contribute nothing at j ≥ K_i
        num = [sum(math.exp(logits[i][b, j].item()) for i in range(3) if j < K[i]) for j in range(5)]
        den = sum(math.exp(x.item()) for i in range(3) for x in logits[i][b])
        for i in range(3):
            y = labels[b, i].item()
            if y >= 0:
                want += -math.log(num[y] / den)
    assert total.item() == pytest.approx(want / 3, rel=1e-5)
    # It is a different objective from Eq. 6-9 (that is why it is only an option).
    assert abs(total.item() - per_head_ce_loss(logits, labels)[0].item()) > 1e-3
