"""Reading a model's dimensions from its HF config, and the layout checks (no megatron needed)."""

import pytest

from moslim_mega.engine.megatron.dims import (Layout, LayoutError, UnsupportedModelError, check_layout, model_dims,
                                              padded_vocab, rope_settings)

from .tiny_hf import hf_config


def _config(arch, **changes):
    return {**hf_config(arch).to_dict(), **changes}


def test_dims_of_each_architecture():
    llama, qwen2, moe = (model_dims(_config(a)) for a in ("llama", "qwen2", "qwen2_moe"))
    assert (llama.num_layers, llama.hidden_size, llama.num_heads, llama.num_query_groups, llama.head_dim) == (4, 16, 4, 2, 4)
    assert not llama.qkv_bias and qwen2.qkv_bias and moe.qkv_bias  # Qwen2 has q/k/v biases
    assert not llama.is_moe and moe.is_moe
    assert (moe.num_experts, moe.moe_ffn_hidden_size, moe.shared_expert_ffn_hidden_size) == (4, 8, 12)
    assert llama.has_lm_head and llama.hf_prefix == "model."
    backbone = model_dims(_config("qwen2", architectures=["Qwen2Model"]))
    assert not backbone.has_lm_head and backbone.hf_prefix == ""


def test_vocabulary_padding_is_the_same_for_every_power_of_two_tp():
    assert padded_vocab(100, 1) == padded_vocab(100, 2) == padded_vocab(100, 8) == 128
    assert padded_vocab(151936, 4) == 151936  # Qwen2's vocabulary is already a multiple of 128
    assert padded_vocab(100, 3) == 384  # lcm(128, 3)


@pytest.mark.parametrize("changes, field", [
    ({"model_type": "mistral"}, "model_type='mistral'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope scaling"),
])
def test_unsupported_llama_configs_name_the_field(changes, field):
    with pytest.raises(UnsupportedModelError, match=field):
        model_dims(_config("llama", **changes))


def test_unsupported_qwen_configs_name_the_field():
    with pytest.raises(UnsupportedModelError, match="use_sliding_window"):
        model_dims(_config("qwen2", use_sliding_window=True))
    with pytest.raises(UnsupportedModelError, match="mlp_only_layers"):
        model_dims(_config("qwen2_moe", mlp_only_layers=[0]))
    with pytest.raises(UnsupportedModelError, match="num_hidden_layers is missing"):
        model_dims({k: v for k, v in _config("qwen2").items() if k != "num_hidden_layers"})


def test_llama3_rope_scaling_maps_to_megatrons_and_other_constants_do_not():
    llama31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    assert rope_settings({"rope_parameters": llama31}) == (500000.0, 8.0)
    assert rope_settings({"rope_theta": 1e6}) == (1e6, None)  # transformers < 5 config
    with pytest.raises(UnsupportedModelError, match="llama3"):
        rope_settings({"rope_parameters": {**llama31, "original_max_position_embeddings": 4096}})


@pytest.mark.parametrize("arch, layout, message", [
    ("llama", Layout(tp=8), "tp=8 does not divide num_attention_heads=4"),
    ("llama", Layout(tp=4), "tp=4 does not divide num_key_value_heads"),
    ("llama", Layout(pp=3), "pp=3 does not divide num_hidden_layers=4"),
    ("llama", Layout(ep=2), "ep=2: expert parallelism needs a MoE model"),
    ("qwen2_moe", Layout(ep=3), "ep=3 does not divide num_experts=4"),
    ("qwen2_moe", Layout(etp=3), "etp=3 does not divide moe_intermediate_size=8"),
    ("llama", Layout(tp=0), "tp=0: expected an integer >= 1"),
    ("llama", Layout(pp=2, vpp=4), "pp×vpp=8 does not divide num_hidden_layers=4"),
])
def test_layout_errors_name_the_size_and_the_field(arch, layout, message):
    with pytest.raises(LayoutError, match=message):
        check_layout(model_dims(_config(arch), tp=max(layout.tp, 1)), layout)
