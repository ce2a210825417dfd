"""Pipeline stages in one process: the stages of a model, run one after the other, give the whole
model's head output exactly; the split keeps parameter names and refuses tied embeddings."""

import copy

import pytest
import torch

from moslim_mega.algos.logprob import sequence_logprobs
from moslim_mega.config import ConfigError
from moslim_mega.parallel.pipeline import layer_ranges, split_model, stage_ids

from .pipeline_models import build, micro_batches


def test_layer_ranges_are_balanced_and_cover_every_layer():
    assert layer_ranges(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert layer_ranges(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(ConfigError, match="5 stages for a model of 4 decoder layers"):
        layer_ranges(4, 5)


def test_interleaved_stages_loop_over_the_ranks():
    assert stage_ids(0, 2, 2) == [0, 2] and stage_ids(1, 2, 2) == [1, 3]


def _reference(role, model, ids, mask):
    if role == "causal_lm":
        return sequence_logprobs(model, ids, mask, temperature=0.7, impl="reference")
    if role == "reward":
        return model(ids, mask, head=lambda h, w, b: (h, w, b))
    return (model(ids, mask),)


@pytest.mark.parametrize("role", ["causal_lm", "reward", "value"])
@pytest.mark.parametrize("qwen", [False, True])
def test_chained_stages_equal_the_whole_model(role, qwen):
    model = build(role, qwen=qwen)
    whole = copy.deepcopy(model)
    names = {n for n, _ in whole.named_parameters()}
    stages = split_model(model, role, [0, 1, 2], 3, temperature=0.7, kernels_impl="reference")
    mb = micro_batches(1, B=3)[0]
    ids, mask = mb["ids_BT"], mb["mask_BT"]
    mask[1, :2] = 0  # a left-padded row too
    x = ids
    for s in stages:
        x = s(x, mask_BT=mask, ids_BT=ids)
    x = (x,) if role == "value" else x
    for got, want in zip(x, _reference(role, whole, ids, mask), strict=True):
        assert torch.equal(got, want)
    # Each parameter lives on exactly one stage, under the whole model's name.
    per_stage = [[n for n, _ in s.named_parameters()] for s in stages]
    assert sorted(sum(per_stage, [])) == sorted(names)
    assert any("embed_tokens" in n for n in per_stage[0]) and not any("embed_tokens" in n for n in per_stage[2])


def test_tied_embeddings_across_stages_are_refused_by_name():
    model = build("causal_lm", tie=True)
    with pytest.raises(ConfigError, match="ties its input embedding and LM head"):
        split_model(model, "causal_lm", [0], 2)
    assert len(split_model(build("causal_lm", tie=True), "causal_lm", [0], 1)) == 1  # one stage: nothing to tie across


def test_activation_checkpointing_per_stage_keeps_the_gradients():
    from moslim_mega.config import ParallelConfig
    from moslim_mega.parallel.pipeline import parallelize_stage

    mb = micro_batches(1, B=2)[0]
    grads = []
    for ac in (False, True):
        stages = split_model(build("value"), "value", [0, 1], 2)
        for s in stages:
            parallelize_stage(s, None, ParallelConfig(activation_checkpointing=ac))
        x = mb["ids_BT"]
        for s in stages:
            x = s(x, mask_BT=mb["mask_BT"], ids_BT=mb["ids_BT"])
        x.square().sum().backward()
        layers = [m for s in stages for m in s.decoder.layers.values()]
        assert all(getattr(m, "gradient_checkpointing", False) == ac for m in layers)  # HF's per-layer recompute
        grads.append({n: p.grad for s in stages for n, p in s.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert max(float((grads[0][n] - grads[1][n]).abs().max()) for n in grads[0]) < 1e-6
