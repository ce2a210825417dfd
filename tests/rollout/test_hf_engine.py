"""HFEngine on a tiny random policy: layout, masks, reproducibility and exact sampling log-probs."""

import dataclasses

import pytest
import torch

from moslim_mega.config import ModelConfig, SamplingConfig
from moslim_mega.data.template import render_prompt
from moslim_mega.models.build import build_causal_lm, build_tokenizer
from moslim_mega.parallel.export import export_hf_weights
from moslim_mega.rollout import HFEngine, RolloutError, encode_prompts

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
PROMPTS = ["<helpfulness 5> how do i bake bread", "tell me about cats", "<honesty 1, harmlessness 2> explain poison"]
EOS_BIAS = 3.7  # ≈ 20% EOS per step on a 157-token vocabulary: most rows end, some run to the limit


def _policy(tok, eos_bias: float = EOS_BIAS):
    model = build_causal_lm(TINY, tok, seed=0)
    if eos_bias:
        # A random model almost never says EOS; lift its EOS logit (inside the model, so generate
        # and the independent recomputation see the same distribution) to exercise the masking.
        bias_V = torch.zeros(model.config.vocab_size)
        bias_V[tok.eos_token_id] = eos_bias
        model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias_V)
    return model


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig())


@pytest.fixture(scope="module")
def gen(tok):
    return HFEngine(_policy(tok), tok)


def _gen(engine, prompts, n, sampling, seed=None):
    """Render once (the seam's encode_prompts), then generate."""
    ids = encode_prompts(engine.tokenizer, prompts) if isinstance(prompts, list) and prompts else []
    return engine.generate(prompts, ids, n, sampling, seed=seed)


def _sampling(**kw):
    return dataclasses.replace(SamplingConfig(max_new_tokens=10), **kw)


def _recompute_logprobs(model, batch, temperature: float):
    """Teacher-forced log-probs of the batch's own tokens, independent of generate()."""
    ids_BT, mask_BT = batch.input_ids_BT, batch.attention_mask_BT
    pos_BT = (mask_BT.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT, position_ids=pos_BT).logits.float()
    # Token t is predicted at position t-1.
    logp_BTV = torch.log_softmax(logits_BTV[:, :-1] / temperature, dim=-1)
    out_BT = torch.zeros_like(batch.logprobs_BT)
    out_BT[:, 1:] = logp_BTV.gather(-1, ids_BT[:, 1:, None]).squeeze(-1)
    return out_BT


def test_layout_rows_are_contiguous_per_prompt(gen, tok):
    n = 3
    b = _gen(gen, PROMPTS, n, _sampling(), seed=0)
    B = len(PROMPTS) * n
    assert len(b) == B and len(b.responses) == B
    assert b.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert b.prompts == [p for p in PROMPTS for _ in range(n)]
    T = b.input_ids_BT.shape[1]
    for t in (b.attention_mask_BT, b.response_mask_BT, b.logprobs_BT):
        assert t.shape == (B, T)
    assert b.logprobs_BT.dtype == torch.float32 and b.finished_B.dtype == torch.bool
    assert 0 < T - b.prompt_width <= 10
    P = b.prompt_width
    for i, p in enumerate(PROMPTS):
        want = tok(render_prompt(tok, p), add_special_tokens=False)["input_ids"]
        for row in range(i * n, i * n + n):
            # Left padding: the rendered prompt ends exactly at column P.
            assert b.input_ids_BT[row, P - len(want) : P].tolist() == want
            assert b.attention_mask_BT[row, :P].tolist() == [0] * (P - len(want)) + [1] * len(want)
    assert not b.response_mask_BT[:, :P].any() and not b.logprobs_BT[:, :P].any()


def test_masks_stop_at_first_eos(gen, tok):
    b = _gen(gen, PROMPTS * 4, 2, _sampling(), seed=3)
    P, eos, pad = b.prompt_width, tok.eos_token_id, tok.pad_token_id
    assert b.finished_B.any() and not b.finished_B.all()  # both kinds of row are exercised
    for row in range(len(b)):
        resp = b.input_ids_BT[row, P:].tolist()
        rmask = b.response_mask_BT[row, P:].tolist()
        if b.finished_B[row]:
            k = resp.index(eos)
            assert rmask == [1] * (k + 1) + [0] * (len(resp) - k - 1)
            assert resp[k + 1 :] == [pad] * (len(resp) - k - 1)
        else:
            assert eos not in resp and len(resp) == 10 and rmask == [1] * 10
        assert torch.equal(b.attention_mask_BT[row, P:], b.response_mask_BT[row, P:])
        lp = b.logprobs_BT[row, P:]
        assert (lp[torch.tensor(rmask) == 0] == 0).all() and (lp[torch.tensor(rmask) == 1] < 0).all()


def test_attention_covers_prompt_and_response(gen):
    b = _gen(gen, PROMPTS, 2, _sampling(), seed=0)
    P = b.prompt_width
    real_prompt_BP = b.input_ids_BT[:, :P] != gen.pad_id
    assert torch.equal(b.attention_mask_BT[:, :P].bool(), real_prompt_BP)
    assert torch.equal(b.attention_mask_BT[:, P:], b.response_mask_BT[:, P:])


def test_same_seed_same_batch_different_seed_differs(gen):
    a = _gen(gen, PROMPTS, 2, _sampling(), seed=7)
    b = _gen(gen, PROMPTS, 2, _sampling(), seed=7)
    c = _gen(gen, PROMPTS, 2, _sampling(), seed=8)
    assert torch.equal(a.input_ids_BT, b.input_ids_BT) and torch.equal(a.logprobs_BT, b.logprobs_BT)
    assert a.responses == b.responses
    assert a.input_ids_BT.shape != c.input_ids_BT.shape or not torch.equal(a.input_ids_BT, c.input_ids_BT)


def test_greedy_is_deterministic_and_copies_agree(gen):
    g1 = _gen(gen, PROMPTS, 3, _sampling(temperature=0.0), seed=1)
    g2 = _gen(gen, PROMPTS, 3, _sampling(temperature=0.0), seed=2)
    assert torch.equal(g1.input_ids_BT, g2.input_ids_BT)
    for i in range(len(PROMPTS)):
        rows = g1.input_ids_BT[3 * i : 3 * i + 3]
        assert (rows == rows[0]).all()
    # Greedy log-probs are those of the raw (temperature 1) distribution.
    want = _recompute_logprobs(gen.model, g1, temperature=1.0)
    m = g1.response_mask_BT.bool()
    assert torch.allclose(g1.logprobs_BT[m], want[m], atol=1e-5)


def test_top_k_1_equals_greedy(gen):
    greedy = _gen(gen, PROMPTS, 2, _sampling(temperature=0.0), seed=0)
    topk1 = _gen(gen, PROMPTS, 2, _sampling(temperature=0.9, top_k=1), seed=5)
    assert torch.equal(greedy.input_ids_BT, topk1.input_ids_BT)
    m = topk1.response_mask_BT.bool()
    assert torch.allclose(topk1.logprobs_BT[m], torch.zeros(int(m.sum())), atol=1e-6)  # one token has all the mass


def test_sampler_logprobs_match_independent_recomputation(gen):
    b = _gen(gen, PROMPTS * 2, 4, _sampling(temperature=0.7), seed=11)
    want = _recompute_logprobs(gen.model, b, temperature=0.7)
    m = b.response_mask_BT.bool()
    assert m.sum() > 20
    assert torch.allclose(b.logprobs_BT[m], want[m], atol=1e-5), (b.logprobs_BT[m] - want[m]).abs().max()


def test_top_p_logprobs_are_renormalised_over_the_nucleus(gen):
    # Under nucleus sampling each kept token has more mass than under the full softmax.
    b = _gen(gen, PROMPTS, 4, _sampling(temperature=1.0, top_p=0.3), seed=2)
    full = _recompute_logprobs(gen.model, b, temperature=1.0)
    m = b.response_mask_BT.bool()
    assert (b.logprobs_BT[m] > full[m] + 1e-4).all()


def test_decoded_responses_match_tokens_up_to_eos(gen, tok):
    b = _gen(gen, PROMPTS, 3, _sampling(), seed=4)
    for row in range(len(b)):
        ids = b.input_ids_BT[row][b.response_mask_BT[row].bool()].tolist()
        assert b.responses[row] == tok.decode(ids, skip_special_tokens=True)
        assert "<eos>" not in b.responses[row]


def test_pad_equal_to_eos_still_masks_after_first_eos():
    tok = build_tokenizer(ModelConfig())
    tok.pad_token = tok.eos_token  # common for real checkpoints without a pad token
    gen = HFEngine(_policy(tok), tok)
    b = _gen(gen, PROMPTS * 3, 2, _sampling(), seed=3)
    P = b.prompt_width
    assert b.finished_B.any()
    for row in range(len(b)):
        resp = b.input_ids_BT[row, P:].tolist()
        n_resp = int(b.response_mask_BT[row].sum())
        if b.finished_B[row]:
            assert n_resp == resp.index(tok.eos_token_id) + 1
        else:
            assert n_resp == len(resp)
    want = _recompute_logprobs(gen.model, b, temperature=1.0)
    m = b.response_mask_BT.bool()
    assert torch.allclose(b.logprobs_BT[m], want[m], atol=1e-5)


def test_training_mode_is_restored_and_pushing_its_own_module_copies_nothing(tok):
    model = _policy(tok)
    gen = HFEngine(model, tok)
    model.train()
    _gen(gen, PROMPTS[:1], 1, _sampling())
    assert model.training
    model.eval()
    _gen(gen, PROMPTS[:1], 1, _sampling())
    assert not model.training
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen.update_weights(export_hf_weights(model, 1 << 20))
    assert gen.pushes == 1 and gen.tensors_copied == 0  # same storage: the engine shares the trainer's module
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_update_weights_refreshes_a_separate_copy(tok):
    trainer, copy_ = _policy(tok, eos_bias=0.0), build_causal_lm(TINY, tok, seed=1)
    engine = HFEngine(copy_, tok)
    assert not torch.equal(copy_.lm_head.weight, trainer.lm_head.weight)
    engine.update_weights(export_hf_weights(trainer, 4096))  # small buckets: many flushes
    assert engine.tensors_copied == len(dict(trainer.named_parameters()))
    for name, p in trainer.named_parameters():
        assert torch.equal(dict(copy_.named_parameters())[name], p), name
    a = _gen(engine, PROMPTS, 2, _sampling(), seed=5)
    b = _gen(HFEngine(trainer, tok), PROMPTS, 2, _sampling(), seed=5)
    assert torch.equal(a.input_ids_BT, b.input_ids_BT) and torch.equal(a.logprobs_BT, b.logprobs_BT)


def test_update_weights_refuses_unknown_missing_and_misshapen_tensors(tok):
    model = _policy(tok, eos_bias=0.0)
    engine = HFEngine(build_causal_lm(TINY, tok, seed=1), tok)
    named = [(n, p.detach().clone()) for n, p in model.named_parameters()]
    with pytest.raises(RolloutError, match="not a parameter"):
        engine.update_weights(named + [("model.bogus.weight", torch.zeros(1))])
    with pytest.raises(RolloutError, match="were not pushed"):
        engine.update_weights(named[1:])
    name, t = named[0]
    with pytest.raises(RolloutError, match=name):
        engine.update_weights([(name, t[:1])] + named[1:])


def test_sleep_and_wake_up_are_recorded(gen):
    gen.sleep(2)
    assert gen.asleep and gen.sleep_calls[-1] == 2
    gen.wake_up()
    assert not gen.asleep


@pytest.mark.parametrize(
    "prompts, n, sampling, field",
    [
        ([], 1, SamplingConfig(), "prompts"),
        ("a prompt", 1, SamplingConfig(), "prompts"),
        (["hi"], 0, SamplingConfig(), "n"),
        (["hi"], 1, SamplingConfig(temperature=-0.1), "sampling.temperature"),
        (["hi"], 1, SamplingConfig(top_p=0.0), "sampling.top_p"),
        (["hi"], 1, SamplingConfig(top_p=1.5), "sampling.top_p"),
        (["hi"], 1, SamplingConfig(top_k=-1), "sampling.top_k"),
        (["hi"], 1, SamplingConfig(max_new_tokens=0), "sampling.max_new_tokens"),
    ],
)
def test_bad_arguments_raise_rollout_error_naming_the_field(gen, prompts, n, sampling, field):
    with pytest.raises(RolloutError, match=field):
        _gen(gen, prompts, n, sampling)
    assert issubclass(RolloutError, ValueError)
