"""GPU checks of the Triton kernels against the references, fp32 and bf16 (skipped without CUDA).
Run by kernels/bench/run_gpu.sh in a session lent the GPU machine."""

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

# bf16 inputs: the reference upcasts to fp32 and so is the more accurate one; the kernel feeds
# bf16 dz to the backward matmuls, so gradients get bf16-level tolerances.
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _run(fn, params, upstream):
    for p in params:
        p.grad = None
    outs = fn()
    sum((o.float() * g).sum() for o, g in zip(outs, upstream)).backward()
    return [o.detach().float() for o in outs] + [p.grad.float().clone() for p in params]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,h,v", [(47, 100, 123), (1000, 1024, 50000)])
def test_linear_logprob_gpu(dtype, n, h, v):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=gen) / h**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    targets[::9] = -100
    up = [torch.randn(n, device="cuda", generator=gen), torch.randn(n, device="cuda", generator=gen)]
    got = _run(lambda: fused_linear_logprob(hidden, weight, targets, 0.8, chunk_size=4096, impl="triton"),
               [hidden, weight], up)
    want = _run(lambda: linear_logprob_reference(hidden, weight, targets, 0.8), [hidden, weight], up)
    for name, a, b in zip(["logp", "entropy", "grad_hidden", "grad_weight"], got, want):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=name)


K = (5, 5, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multihead_head_gpu(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    b, d = 300, 1000
    hidden = torch.randn(b, d, device="cuda", generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(12, d, device="cuda", generator=gen) / d**0.5).to(dtype).requires_grad_()
    bias = torch.randn(12, device="cuda", generator=gen).to(dtype).requires_grad_()
    labels = torch.stack([torch.randint(-1, k, (b,), device="cuda", generator=gen) for k in K], 1)
    labels[:, 2] = -1
    up = [torch.tensor(1.0, device="cuda"), torch.randn(3, device="cuda", generator=gen)]
    params = [hidden, weight, bias]
    got = _run(lambda: fused_multihead_head(hidden, weight, bias, K, labels, impl="triton"), params, up)
    want = _run(lambda: multihead_head_loss_reference(hidden, weight, bias, K, labels), params, up)
    for name, x, y in zip(["total", "per_head", "grad_hidden", "grad_weight", "grad_bias"], got, want):
        torch.testing.assert_close(x, y, **TOL[dtype], msg=name)
    stats = RunningClassStats(K)
    stats.update([torch.softmax(torch.randn(50, k), 1) for k in K])
    targets = torch.stack([torch.randint(-1, k, (b,), device="cuda", generator=gen) for k in K], 1)
    mapper = RewardMapper(stats, kind="zscore", normalize_by="named")
    with torch.no_grad():
        p1, r1 = fused_multihead_reward(hidden, weight, bias, K, targets, **mapper.kernel_args(), impl="triton")
        p2, r2 = multihead_reward_reference(hidden, weight, bias, K, targets, **mapper.kernel_args())
    torch.testing.assert_close(p1, p2, **TOL[dtype])
    torch.testing.assert_close(r1, r2, **TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wired_call_sites_take_triton_on_cuda(dtype, monkeypatch):
    """What the trainers run on a GPU with kernels.impl=auto: the policy's log-probs (plain and the
    parallel LM head) and the RM's training head, equal to the reference path."""
    import transformers

    from moslim_mega.algos.logprob import sequence_logprobs
    from moslim_mega.kernels import linear_logprob
    from moslim_mega.parallel.vocab_parallel import install_logprob_head
    from moslim_mega.reward.model import MultiHeadRewardModel
    from moslim_mega.reward.trainer import _head_loss

    monkeypatch.delenv("MOSLIM_KERNELS", raising=False)
    impls = []
    state = linear_logprob._local_state
    monkeypatch.setattr(linear_logprob, "_local_state", lambda *a: impls.append(a[-1]) or state(*a))
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=5003, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    gen = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 5003, (4, 33), device="cuda", generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    for parallel_head in (False, True):
        model = transformers.LlamaForCausalLM(cfg).to("cuda", dtype)
        if parallel_head:
            install_logprob_head(model)
        outs = []
        for impl in ("auto", "reference"):
            model.zero_grad()
            logp, ent = sequence_logprobs(model, ids, mask, 0.9, chunk_size=1024, impl=impl)
            (logp.sum() + ent.sum()).backward()
            outs.append([logp.detach(), ent.detach(), model.lm_head.weight.grad.float().clone()])
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, **TOL[dtype])
    assert impls == ["triton", "reference"] * 2
    rm = MultiHeadRewardModel(transformers.LlamaModel(cfg), K).to("cuda", dtype)
    labels = torch.stack([torch.randint(-1, k, (4,), device="cuda", generator=gen) for k in K], 1)
    got = _head_loss(rm, ids, mask, labels, None, "per_head_ce", "auto")
    want = _head_loss(rm, ids, mask, labels, None, "per_head_ce", "reference")
    for a, b in zip([got[0], *got[1], *got[2]], [want[0], *want[1], *want[2]]):
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])
