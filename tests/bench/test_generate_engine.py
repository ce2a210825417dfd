"""Benchmark answers go through the rollout engine and equal the direct HF generate path (the
pre-seam code, still used for the server's top-k log-probs) token for token."""

import pytest
import torch

from moslim_mega.bench.generate import ChatModel
from moslim_mega.config import ConfigError, ModelConfig, RolloutConfig
from moslim_mega.models.build import build_causal_lm, build_tokenizer

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
CONVS = [
    [{"role": "user", "content": "how do i bake bread"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "cats?"},
     {"role": "assistant", "content": "they purr"}, {"role": "user", "content": "and dogs?"}],
    [{"role": "user", "content": "explain tides"}],
]


def _chat_model(eos_bias: float):
    tok = build_tokenizer(ModelConfig())
    model = build_causal_lm(TINY, tok, seed=0)
    bias_V = torch.zeros(model.config.vocab_size)
    bias_V[tok.eos_token_id] = eos_bias  # sampled answers: some end, some hit the limit
    model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias_V)
    return ChatModel(model, tok)


@pytest.mark.parametrize("temperature, eos_bias", [(0.0, 0.0), (1.0, 2.5)])
def test_engine_answers_equal_the_direct_hf_path(temperature, eos_bias):
    m = _chat_model(eos_bias)
    assert m.engine.name == "hf"
    via_engine = m.chat_detailed(CONVS * 2, 10, temperature, seed=5, batch_size=4)
    direct = m.chat_detailed(CONVS * 2, 10, temperature, seed=5, batch_size=4, top_logprobs=0)
    assert [(a.text, a.num_prompt_tokens, a.num_completion_tokens, a.finished) for a in via_engine] == \
        [(a.text, a.num_prompt_tokens, a.num_completion_tokens, a.finished) for a in direct]
    assert any(a.text for a in direct) and (temperature == 0 or any(a.finished for a in direct))


def test_vllm_engine_needs_a_model_directory():
    tok = build_tokenizer(ModelConfig())
    with pytest.raises(ConfigError, match="rollout.engine=vllm"):
        ChatModel(build_causal_lm(TINY, tok, seed=0), tok, rollout=RolloutConfig(engine="vllm"))
