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
    probs, reward = fused_multihead_reward(hidden, weight, bias, K, targets, **mapper.kernel_args(), impl="triton")
    want_probs, want_reward = multihead_reward_reference(hidden, weight, bias, K, targets, **mapper.kernel_args())
    torch.testing.assert_close(probs, want_probs, **TOL)
    torch.testing.assert_close(reward, want_reward, **TOL)
    assert reward[0] == 0


# ---- the call sites (issue 7 wiring): what the trainers run with kernels.impl=triton --------------
@pytest.fixture
def launches(monkeypatch):
    """Counts Triton launches per kernel family, so a call site that silently took the reference
    path fails its test."""
    from moslim_mega.kernels import linear_logprob, multihead_head

    seen = {"logprob": 0, "head": 0}
    local_state, layout = linear_logprob._local_state, multihead_head._layout

    def spy_state(*args):
        seen["logprob"] += args[-1] == "triton"
        return local_state(*args)

    def spy_layout(*args):
        seen["head"] += 1  # only the Triton paths lay out the head columns
        return layout(*args)

    monkeypatch.setattr(linear_logprob, "_local_state", spy_state)
    monkeypatch.setattr(multihead_head, "_layout", spy_layout)
    return seen


def _tiny_llama(vocab=83, seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg)


def _padded_batch(vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, 8:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("parallel_head", [False, True])
def test_policy_logprobs_and_sft_loss_run_the_triton_kernel(parallel_head, launches):
    from moslim_mega.algos.logprob import sequence_logprobs
    from moslim_mega.config import KernelsConfig
    from moslim_mega.parallel.vocab_parallel import install_logprob_head
    from moslim_mega.sft import sft_loss

    model = _tiny_llama()
    if parallel_head:  # the head a parallelised policy carries (here without a process group)
        install_logprob_head(model)
    ids, mask = _padded_batch(83)
    labels = torch.where(mask.bool(), ids, -100)
    labels[:, :6] = -100
    params = [p for p in model.parameters()]
    results = []
    for impl in ("triton", "reference"):
        model.zero_grad()
        logp, ent = sequence_logprobs(model, ids, mask, temperature=0.8, chunk_size=32, impl=impl)
        loss = sft_loss(model, ids, mask, labels, KernelsConfig(impl=impl, logprob_chunk=32))
        (logp.sum() + 0.5 * ent.sum() + loss).backward()
        results.append([logp.detach(), ent.detach(), loss.detach()] + [p.grad.clone() for p in params])
        if impl == "triton":
            assert launches["logprob"] == 2  # sequence_logprobs and sft_loss
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, **TOL, msg=f"output/grad {i}")
    assert results[0][0].abs().sum() > 0 and results[0][3].abs().sum() > 0


def _tiny_rm():
    import transformers

    from moslim_mega.reward.model import MultiHeadRewardModel

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=83, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    return MultiHeadRewardModel(transformers.LlamaModel(cfg), K)


def test_rm_training_head_runs_the_triton_kernel(launches):
    from moslim_mega.reward.trainer import _head_loss

    model = _tiny_rm()
    ids, mask = _padded_batch(83, seed=1)
    labels = torch.tensor([[4, -1, 1], [0, 2, -1], [2, 1, 0]])
    weights = [torch.rand(k) + 0.5 for k in K]
    results = []
    for impl in ("triton", "reference"):
        model.zero_grad()
        loss, per_head, probs = _head_loss(model, ids, mask, labels, weights, "per_head_ce", impl)
        loss.backward()
        results.append([loss.detach(), torch.stack(per_head).detach(), torch.cat(probs, 1)]
                       + [p.grad.clone() for p in model.parameters()])
        assert launches["head"] == 1
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, **TOL, msg=f"output/grad {i}")


def test_reward_worker_scores_with_the_triton_kernel(launches):
    from moslim_mega.config import ModelConfig, PrefsConfig
    from moslim_mega.models.build import build_backbone, build_tokenizer
    from moslim_mega.policy.workers import RewardWorker
    from moslim_mega.prefs import spec_from_config
    from moslim_mega.reward.io import LoadedRewardModel
    from moslim_mega.reward.model import MultiHeadRewardModel

    spec = spec_from_config(PrefsConfig())
    mc = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    tokenizer = build_tokenizer(mc, spec.names)
    model = MultiHeadRewardModel(build_backbone(mc, tokenizer, seed=0), spec.num_classes).eval()
    gen = torch.Generator().manual_seed(2)
    stats = RunningClassStats(spec.num_classes)
    stats.update([torch.softmax(3 * torch.randn(30, k, generator=gen), 1) for k in spec.num_classes])
    rm = LoadedRewardModel(model, tokenizer, spec, stats, max_length=96)
    names = spec.names
    prompts = [f"<{names[0]} 4><{names[-1]} 1> How do I bake bread?", f"<{names[1]} 2> What is rain?", "Hello?"]
    responses = ["Mix flour and water.", "Water falling from clouds.", "Hi."]
    outs = [RewardWorker(rm, RewardMapper(stats), impl=impl).score(prompts, responses) for impl in ("triton", "reference")]
    assert launches["head"] == 1
    for field in ("reward_B", "terms_BH", "targets_BH"):
        torch.testing.assert_close(getattr(outs[0], field), getattr(outs[1], field), **TOL, msg=field)
    assert outs[0].reward_B[2] == 0 and outs[0].reward_B[:2].abs().min() > 0
