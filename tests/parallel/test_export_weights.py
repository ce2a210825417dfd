"""export_hf_weights: HF names, wrapper prefixes removed, tied weights once, lazy bucketed stream."""

import pytest
import torch
from torch import nn

from moslim_mega.config import ModelConfig
from moslim_mega.models.build import build_causal_lm, build_tokenizer
from moslim_mega.parallel import export
from moslim_mega.parallel.export import export_hf_weights, hf_name

TINY = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def model():
    return build_causal_lm(TINY, build_tokenizer(ModelConfig()), seed=0)


def test_names_are_the_hf_checkpoint_names_and_tensors_the_weights(model):
    out = list(export_hf_weights(model, 1 << 20))
    assert [n for n, _ in out] == list(model.state_dict())  # untied tiny model: every weight once
    sd = model.state_dict()
    assert all(torch.equal(t, sd[n]) for n, t in out)


def test_wrapper_prefixes_are_removed():
    assert hf_name("model.layers.0._checkpoint_wrapped_module.self_attn.q_proj.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert hf_name("_orig_mod.lm_head.weight") == "lm_head.weight"


def test_tied_lm_head_is_sent_once_under_the_embedding_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(5, 3)
            self.lm_head = nn.Linear(3, 5, bias=False)
            self.lm_head.weight = self.embed_tokens.weight

    assert [n for n, _ in export_hf_weights(Tied(), 1)] == ["embed_tokens.weight"]


def test_the_stream_gathers_one_bucket_at_a_time(model, monkeypatch):
    gathered = []
    real = export._gather

    def spy(p):
        gathered.append(p)
        return real(p)

    monkeypatch.setattr(export, "_gather", spy)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    bucket = sizes[0] + sizes[1]  # the first bucket closes after two tensors
    stream = export_hf_weights(model, bucket)
    assert gathered == []  # lazy: nothing gathered before the consumer asks
    next(stream)
    assert len(gathered) == 2
    next(stream)
    assert len(gathered) == 2  # the second tensor came from the same bucket
    rest = list(stream)
    assert len(gathered) == len(sizes) == 2 + len(rest)
