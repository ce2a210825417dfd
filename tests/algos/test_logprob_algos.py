import pytest
import torch

from moslim_mega.algos.core import AlgoError
from moslim_mega.algos.logprob import (
    chunked_linear_logprob_entropy,
    linear_logprob_entropy_reference,
    sequence_logprobs,
)

D64 = torch.float64


def _inputs(n, h, v, seed=0, dtype=D64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (scale * torch.randn(n, h, generator=g, dtype=D64)).to(dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=D64).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, targets


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_passes_gradcheck_on_odd_shapes(temperature):
    hidden, weight, targets = _inputs(7, 5, 13)
    targets[:3] = torch.tensor([0, 12, 4])  # first, last, and a chunk-boundary id (chunk_size 4)
    fn = lambda h, w: chunked_linear_logprob_entropy(h, w, targets, temperature, chunk_size=4)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (hidden, weight))


@pytest.mark.parametrize("temperature", [1.0, 1.3])
@pytest.mark.parametrize("use", ["both", "logp", "entropy"])
def test_chunked_matches_reference_forward_and_backward_in_float64(temperature, use):
    n, v = 47, 123
    hidden, weight, targets = _inputs(n, 16, v, seed=1)
    targets[:4] = torch.tensor([0, 31, 32, v - 1])  # ids on both sides of a chunk edge
    g = torch.Generator().manual_seed(2)
    up_lp, up_ent = torch.randn(n, generator=g, dtype=D64), torch.randn(n, generator=g, dtype=D64)
    results = []
    for fn in (linear_logprob_entropy_reference, chunked_linear_logprob_entropy):
        kwargs = {"chunk_size": 32} if fn is chunked_linear_logprob_entropy else {}
        logp, ent = fn(hidden, weight, targets, temperature, **kwargs)
        loss_lp, loss_ent = (up_lp * logp).sum(), (up_ent * ent).sum()
        loss = {"both": loss_lp + loss_ent, "logp": loss_lp, "entropy": loss_ent}[use]
        results.append((logp, ent, *torch.autograd.grad(loss, (hidden, weight))))
    for ref, got in zip(*results):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    assert results[0][3].abs().sum() > 0


@pytest.mark.parametrize("chunk_size", [1, 7, 123, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    hidden, weight, targets = _inputs(9, 8, 123, seed=3)
    ref = linear_logprob_entropy_reference(hidden, weight, targets)
    got = chunked_linear_logprob_entropy(hidden, weight, targets, chunk_size=chunk_size)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-12)


def test_large_logits_stay_finite_and_match_reference():
    # Logits of order 1e3: a naive exp would overflow; the online max must keep it stable.
    hidden, weight, targets = _inputs(11, 8, 50, seed=4, dtype=torch.float32, scale=300.0)
    ref = linear_logprob_entropy_reference(hidden, weight, targets)
    got = chunked_linear_logprob_entropy(hidden, weight, targets, chunk_size=8)
    assert all(torch.isfinite(t).all() for t in got)
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-3)


def test_bf16_inputs_compute_in_float32_and_return_float32():
    hidden, weight, targets = _inputs(13, 16, 77, seed=5, dtype=torch.bfloat16)
    logp, ent = chunked_linear_logprob_entropy(hidden, weight, targets, chunk_size=16)
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    ref = linear_logprob_entropy_reference(hidden.float(), weight.float(), targets)
    torch.testing.assert_close(logp, ref[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent, ref[1], rtol=1e-5, atol=1e-5)
    (logp.sum() + ent.sum()).backward()
    assert hidden.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.bfloat16


def test_chunked_rejects_bad_targets_and_temperature():
    hidden, weight, targets = _inputs(3, 4, 5)
    with pytest.raises(AlgoError, match="targets_N"):
        chunked_linear_logprob_entropy(hidden, weight, torch.tensor([0, 5, 1]))
    with pytest.raises(AlgoError, match="temperature"):
        chunked_linear_logprob_entropy(hidden, weight, targets, temperature=0.0)


def _tiny_llama(seed=0):
    import transformers  # a hard dependency of the package
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _reference_logprobs(model, ids, mask):
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_sequence_logprobs_match_full_logits_of_a_tiny_llama(padding, temperature):
    model = _tiny_llama()
    g = torch.Generator().manual_seed(6)
    lengths = [9, 5, 7]
    ids = torch.randint(0, 50, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for b, n in enumerate(lengths):
        if padding == "right":
            mask[b, :n] = 1
        else:
            mask[b, 9 - n:] = 1
    ids = torch.where(mask.bool(), ids, 0)
    logp, ent = sequence_logprobs(model, ids, mask, temperature=temperature, chunk_size=16)
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float() / temperature
        lp_all = torch.log_softmax(logits[:, :-1], -1)
        ref_lp = lp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
        ref_ent = -(lp_all.exp() * lp_all).sum(-1)
    scored = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)  # a token with a real predecessor
    assert int(scored.sum()) == sum(n - 1 for n in lengths)
    torch.testing.assert_close(logp[:, 1:][scored], ref_lp[scored], rtol=0, atol=1e-5)
    torch.testing.assert_close(ent[:, 1:][scored], ref_ent[scored], rtol=0, atol=1e-5)
    assert torch.all(logp[:, 1:][~scored] == 0) and torch.all(logp[:, 0] == 0)
    assert torch.all(ent[:, 1:][~scored] == 0) and torch.all(ent[:, 0] == 0)


def test_left_and_right_padded_copies_of_a_sequence_give_the_same_logprobs_and_gradients():
    model = _tiny_llama(seed=1)
    seq = torch.randint(0, 50, (6,), generator=torch.Generator().manual_seed(7))
    right, left = torch.zeros(1, 9, dtype=torch.long), torch.zeros(1, 9, dtype=torch.long)
    right[0, :6], left[0, 3:] = seq, seq
    m_right, m_left = (torch.arange(9) < 6).long()[None], (torch.arange(9) >= 3).long()[None]
    grads, outs = [], []
    for ids, mask in ((right, m_right), (left, m_left)):
        model.zero_grad()
        logp, _ = sequence_logprobs(model, ids, mask, chunk_size=8)
        logp.sum().backward()
        outs.append(logp[mask.bool()])
        grads.append(model.lm_head.weight.grad.clone())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-5)
    assert grads[0].abs().sum() > 0


def test_sequence_logprobs_gradients_match_the_full_logits_path():
    model = _tiny_llama(seed=2)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(8))
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    params = [p for p in model.parameters()]
    logp, ent = sequence_logprobs(model, ids, mask, chunk_size=8)
    got = torch.autograd.grad(logp.sum() + 0.3 * ent.sum(), params)
    ref_lp, ref_ent = _reference_logprobs(model, ids, mask)
    scored = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
    ref = torch.autograd.grad(ref_lp[scored].sum() + 0.3 * ref_ent[scored].sum(), params)
    for g_got, g_ref in zip(got, ref):
        torch.testing.assert_close(g_got, g_ref, rtol=1e-4, atol=1e-5)


def test_sequence_logprobs_refuses_a_head_with_bias():
    model = _tiny_llama()
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(50))
    with pytest.raises(AlgoError, match="bias"):
        sequence_logprobs(model, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long))
