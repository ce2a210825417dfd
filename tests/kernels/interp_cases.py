"""Triton kernels run in interpreter mode (fp32, odd shapes) against the plain-PyTorch references.

Not collected by the main run (no ``test_`` prefix): tests/kernels/test_interpreter.py runs this
file in a subprocess with TRITON_INTERPRET=1, which must be set before triton is imported.
"""

import os

import pytest
import torch

from moslim_mega.kernels.linear_logprob import fused_linear_logprob, linear_logprob_reference
from moslim_mega.kernels.multihead_head import (
    fused_multihead_head,
    fused_multihead_reward,
    multihead_head_loss_reference,
    multihead_reward_reference,
)
from moslim_mega.reward.mapping import RewardMapper, RunningClassStats

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/kernels/test_interpreter.py"
TOL = dict(rtol=1e-5, atol=1e-5)


def _grads(fn, params, upstream):
    for p in params:
        p.grad = None
    outs = fn()
    sum((o * g).sum() for o, g in zip(outs, upstream)).backward()
    return [o.detach() for o in outs] + [p.grad.clone() for p in params]


@pytest.mark.parametrize("n,h,v,chunk,temp", [(47, 37, 123, 50, 0.7), (5, 16, 300, 8192, 1.0)])
def test_linear_logprob_triton_matches_reference(n, h, v, chunk, temp):
    gen = torch.Generator().manual_seed(n + v)
    hidden = torch.randn(n, h, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::7] = -100  # ignore-index rows: zero outputs, zero gradient
    upstream = [torch.randn(n, generator=gen), torch.randn(n, generator=gen)]
    got = _grads(lambda: fused_linear_logprob(hidden, weight, targets, temp, chunk_size=chunk, impl="triton"),
                 [hidden, weight], upstream)
    want = _grads(lambda: linear_logprob_reference(hidden, weight, targets, temp), [hidden, weight], upstream)
    for name, a, b in zip(["logp", "entropy", "grad_hidden", "grad_weight"], got, want):
        torch.testing.assert_close(a, b, **TOL, msg=name)
    assert (got[0][::7] == 0).all() and (got[1][::7] == 0).all()
    assert got[1][targets != -100].min() > 0  # entropies of non-degenerate rows are positive


def test_linear_logprob_triton_single_output_gradient():
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(9, 20, generator=gen).requires_grad_()
    weight = torch.randn(33, 20, generator=gen).requires_grad_()
    targets = torch.randint(0, 33, (9,), generator=gen)
    fused_linear_logprob(hidden, weight, targets, chunk_size=16, impl="triton")[1].sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    linear_logprob_reference(hidden, weight, targets)[1].sum().backward()
    torch.testing.assert_close(got, hidden.grad, **TOL)


K = (5, 3, 2)


def _head_inputs(b=47, d=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, d, generator=gen).requires_grad_()
    weight = (torch.randn(sum(K), d, generator=gen) * 0.3).requires_grad_()
    bias = torch.randn(sum(K), generator=gen).requires_grad_()
    labels = torch.stack([torch.randint(-1, k, (b,), generator=gen) for k in K], 1)
    return gen, hidden, weight, bias, labels


@pytest.mark.parametrize("weighted", [False, True])
def test_multihead_head_loss_triton_matches_reference(weighted):
    gen, hidden, weight, bias, labels = _head_inputs()
    labels[:, 1] = -1  # a masked head: no labels, contributes exactly 0
    cw = [torch.rand(k, generator=gen) + 0.5 for k in K] if weighted else None
    upstream = [torch.tensor(0.7), torch.randn(len(K), generator=gen)]
    params = [hidden, weight, bias]
    got = _grads(lambda: fused_multihead_head(hidden, weight, bias, K, labels, cw, impl="triton"), params, upstream)
    want = _grads(lambda: multihead_head_loss_reference(hidden, weight, bias, K, labels, cw), params, upstream)
    for name, a, b in zip(["total", "per_head", "grad_hidden", "grad_weight", "grad_bias"], got, want):
        torch.testing.assert_close(a, b, **TOL, msg=name)
    assert got[1][1] == 0 and got[1][0] > 0


@pytest.mark.parametrize("kind", ["zscore", "logprob", "neg_abs_dist"])
@pytest.mark.parametrize("normalize_by,clip", [("all", 0.0), ("named", 0.3)])
def test_multihead_reward_triton_matches_mapper(kind, normalize_by, clip):
    gen, hidden, weight, bias, _ = _head_inputs(b=21, seed=1)
    stats = RunningClassStats(K)
    stats.update([torch.softmax(torch.randn(30, k, generator=gen), 1) for k in K])
    targets = torch.stack([torch.randint(-1, k, (21,), generator=gen) for k in K], 1)
    targets[0] = -1  # a row with no named head
    mapper = RewardMapper(stats, kind=kind, normalize_by=normalize_by, clip=clip)
    probs, reward = fused_multihead_reward(hidden, weight, bias, K, targets, mapper, impl="triton")
    want_probs, want_reward = multihead_reward_reference(hidden, weight, bias, K, targets, mapper)
    torch.testing.assert_close(probs, want_probs, **TOL)
    torch.testing.assert_close(reward, want_reward, **TOL)
    assert reward[0] == 0
