"""The HF engine behind the seam reproduces the pre-seam HFGenerator exactly: same seeds → the same
tokens, masks, log-probs and texts, on the world's tiny policy (the default ModelConfig)."""

import dataclasses

import pytest
import torch
from legacy_hf_generator import HFGenerator

from moslim_mega.config import ModelConfig, SamplingConfig
from moslim_mega.models.build import build_causal_lm, build_tokenizer
from moslim_mega.rollout import HFEngine, encode_prompts

PROMPTS = ["<helpfulness 5> how do i bake bread", "tell me about cats", "<honesty 1, harmlessness 2> explain poison",
           "what is the capital of france"]


def _policy(tok):
    model = build_causal_lm(ModelConfig(), tok, seed=0)
    bias_V = torch.zeros(model.config.vocab_size)
    bias_V[tok.eos_token_id] = 3.5  # rows that end early and rows that run to the limit
    model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias_V)
    return model


@pytest.mark.parametrize("pad_is_eos", [False, True])
@pytest.mark.parametrize("sampling", [
    SamplingConfig(temperature=1.0, max_new_tokens=12),
    SamplingConfig(temperature=0.7, top_k=20, max_new_tokens=12),
    SamplingConfig(temperature=1.3, top_p=0.8, max_new_tokens=12),
    SamplingConfig(temperature=0.0, max_new_tokens=12),
], ids=["t1", "topk", "topp", "greedy"])
def test_new_engine_equals_the_old_batch(sampling, pad_is_eos):
    tok = build_tokenizer(ModelConfig())
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    model = _policy(tok)
    old = HFGenerator(model, tok).generate(PROMPTS, 3, sampling, seed=17)
    new = HFEngine(model, tok).generate(PROMPTS, encode_prompts(tok, PROMPTS), 3, sampling, seed=17)
    assert old.finished_B.any()  # the cut after the first EOS is exercised
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if isinstance(a, torch.Tensor):
            assert a.dtype == b.dtype and torch.equal(a, b), f.name
        else:
            assert a == b, f.name
