"""The tensor mapping: q/k/v per query group, [gate; up] sharded separately, and HF → rank-local
shards → HF bit-exact for tp=2, pp=2, ep=2 layouts (no megatron needed: plain tensors)."""

import pytest
import torch

from moslim_mega.engine.megatron.dims import Layout, model_dims
from moslim_mega.engine.megatron.mapping import (FC1, QKV, MissingTensorError, RankCoords, Rule, ShapeMismatchError,
                                                 all_coords, hf_shapes, instances, iter_hf_tensors, merge_rank_state_dicts, rank_state_dict,
                                                 rules, to_hf, to_megatron, tp_merge, tp_shard)

from .tiny_hf import hf_config


def _dims(arch, tied=False, tp=1):
    return model_dims(hf_config(arch, tied).to_dict(), tp=tp)


def _hf_state(dims, rule_list, seed=0):
    """Random HF tensors of the right shapes for every name the rules use."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for rule in rule_list:
        for layer, expert in instances(dims, rule):
            for name, shape in zip(rule.hf_names(dims, layer, expert), hf_shapes(rule, dims)):
                state[name] = torch.randn(shape, generator=gen)
    return state


def test_qkv_is_concatenated_per_query_group():
    dims = _dims("qwen2")  # 4 query heads in 2 groups, head dim 4
    rule = next(r for r in rules(dims) if r.kind == QKV and r.key.endswith("weight"))
    hd, D = 4, 16
    q = torch.arange(4 * hd * D, dtype=torch.float32).reshape(4 * hd, D)
    k, v = -torch.arange(2 * hd * D).reshape(2 * hd, D).float(), 1000 + torch.arange(2 * hd * D).reshape(2 * hd, D).float()
    qkv = to_megatron(rule, dims, [q, k, v], ["q", "k", "v"])
    rows = list(qkv.split(hd))  # one head's rows at a time: group 0 = q0 q1 k0 v0, group 1 = q2 q3 k1 v1
    expected = [q[:hd], q[hd:2 * hd], k[:hd], v[:hd], q[2 * hd:3 * hd], q[3 * hd:], k[hd:], v[hd:]]
    assert all(torch.equal(a, b) for a, b in zip(rows, expected))
    # TP=2: each rank holds whole groups, i.e. its own q heads with their k and v.
    assert torch.equal(tp_shard(rule, qkv, 1, 2), torch.cat(expected[4:]))
    assert all(torch.equal(a, b) for a, b in zip(to_hf(rule, dims, qkv, "qkv"), [q, k, v]))


def test_fc1_shards_gate_and_up_separately():
    dims = _dims("llama")
    rule = next(r for r in rules(dims) if r.kind == FC1)
    gate, up = torch.randn(24, 16), torch.randn(24, 16)
    fc1 = to_megatron(rule, dims, [gate, up], ["gate", "up"])
    assert torch.equal(fc1, torch.cat([gate, up]))
    shard0, shard1 = (tp_shard(rule, fc1, r, 2) for r in (0, 1))
    assert torch.equal(shard0, torch.cat([gate[:12], up[:12]])) and torch.equal(shard1, torch.cat([gate[12:], up[12:]]))
    assert torch.equal(tp_merge(rule, [shard0, shard1]), fc1)


def test_vocabulary_rows_are_padded_with_zeros_and_dropped_on_the_way_back():
    dims = _dims("llama", tp=2)
    emb_rule = rules(dims)[0]
    emb = torch.randn(100, 16)
    padded = to_megatron(emb_rule, dims, [emb], ["embed"])
    assert padded.shape == (128, 16) and torch.equal(padded[:100], emb) and not padded[100:].any()
    assert torch.equal(to_hf(emb_rule, dims, padded, "emb")[0], emb)


@pytest.mark.parametrize("arch, tied, layout", [
    ("llama", False, Layout(tp=2)), ("llama", True, Layout(pp=2)), ("llama", True, Layout(tp=2, pp=2)),
    ("qwen2", True, Layout(tp=2)), ("qwen2", False, Layout(tp=2, pp=2)),
    ("qwen2_moe", False, Layout(ep=2)), ("qwen2_moe", False, Layout(tp=2, pp=2, ep=2)),
    ("qwen2_moe", False, Layout(tp=2, ep=2, etp=1)), ("qwen2_moe", True, Layout(pp=2, ep=4)),
    ("llama", True, Layout(pp=2, vpp=2)), ("qwen2_moe", False, Layout(tp=2, pp=2, vpp=2, ep=2)),
])
def test_hf_to_rank_shards_and_back_is_bit_exact(arch, tied, layout):
    dims = _dims(arch, tied, layout.tp)
    rule_list = rules(dims)
    hf = _hf_state(dims, rule_list)

    def get_whole(rule, layer, expert):
        names = rule.hf_names(dims, layer, expert)
        return to_megatron(rule, dims, [hf[n] for n in names], names)

    shards = {c: rank_state_dict(dims, layout, c, rule_list, get_whole) for c in all_coords(layout)}
    # Each rank holds only its share: e.g. a layer's q/k/v rows split TP ways, half the layers under PP=2.
    c0 = RankCoords()
    qkv0 = shards[c0]["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert qkv0.shape[0] == (4 + 2 * 2) * 4 // layout.tp
    chunk_layers = 4 // (layout.pp * layout.vpp)
    assert sum(k.endswith("linear_qkv.weight") for k in shards[c0]) == chunk_layers
    if dims.is_moe:
        assert sum(".local_experts." in k and k.endswith("fc1.weight") for k in shards[c0]) == chunk_layers * 4 // layout.ep
    back = dict(iter_hf_tensors(dims, layout, rule_list, shards))
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_tied_embeddings_give_the_last_stage_its_output_layer_copy():
    dims, layout = _dims("qwen2", tied=True), Layout(pp=2)
    rule_list = rules(dims)
    hf = _hf_state(dims, rule_list)
    get = lambda rule, layer, expert: to_megatron(rule, dims, [hf[n] for n in rule.hf_names(dims, layer, expert)], rule.hf)  # noqa: E731
    first, last = (rank_state_dict(dims, layout, RankCoords(pp=p), rule_list, get) for p in (0, 1))
    assert "output_layer.weight" not in first and "embedding.word_embeddings.weight" not in last
    assert torch.equal(last["output_layer.weight"], first["embedding.word_embeddings.weight"])
    assert "decoder.layers.1.input_layernorm.weight" in first and "decoder.layers.1.input_layernorm.weight" in last
    assert torch.equal(last["decoder.layers.0.input_layernorm.weight"], hf["model.layers.2.input_layernorm.weight"])


def test_bad_shapes_and_missing_shards_name_the_tensor():
    dims = _dims("llama")
    rule = rules(dims)[0]
    with pytest.raises(ShapeMismatchError, match=r"model.embed_tokens.weight: shape \(99, 16\)"):
        to_megatron(rule, dims, [torch.zeros(99, 16)], ["model.embed_tokens.weight"])
    layout = Layout(tp=2)
    partial = {RankCoords(tp=0): {}}
    with pytest.raises(MissingTensorError, match="embedding.word_embeddings.weight is missing"):
        list(merge_rank_state_dicts(dims, layout, rules(dims), partial))
    assert isinstance(rule, Rule)


def test_virtual_stages_interleave_the_layers():
    """pp=2, vpp=2 over 4 layers: chunk k holds layer k and runs on PP rank k % 2 as virtual stage
    k // 2, so PP rank 0 holds layers 0 and 2 (megatron's interleaved assignment)."""
    dims, layout = _dims("llama", tied=True), Layout(pp=2, vpp=2)
    rule_list = rules(dims)
    hf = _hf_state(dims, rule_list)
    get = lambda rule, layer, expert: to_megatron(rule, dims, [hf[n] for n in rule.hf_names(dims, layer, expert)], rule.hf)  # noqa: E731
    chunk = {c: rank_state_dict(dims, layout, c, rule_list, get) for c in all_coords(layout)}
    for pp, vp, layer in ((0, 0, 0), (1, 0, 1), (0, 1, 2), (1, 1, 3)):
        norm = chunk[RankCoords(pp=pp, vp=vp)]["decoder.layers.0.input_layernorm.weight"]
        assert torch.equal(norm, hf[f"model.layers.{layer}.input_layernorm.weight"])
    assert "embedding.word_embeddings.weight" in chunk[RankCoords(pp=0, vp=0)]
    assert "output_layer.weight" in chunk[RankCoords(pp=1, vp=1)]  # the last chunk, not PP rank 1's first
    assert "output_layer.weight" not in chunk[RankCoords(pp=1, vp=0)]
