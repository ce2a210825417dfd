"""``moslim convert``: HF → Megatron (dist_checkpointing) → HF bit-exact for tiny random Llama,
Qwen2 and Qwen2-MoE models and the multi-head RM; streaming; errors that name the problem."""

import json
import weakref

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from moslim_mega.cli import main  # noqa: E402
from moslim_mega.engine.megatron import dist_ckpt  # noqa: E402
from moslim_mega.engine.megatron.convert import HFTensorSource, hf_to_megatron, megatron_to_hf  # noqa: E402
from moslim_mega.engine.megatron.dims import ConversionError, Layout, model_dims  # noqa: E402
from moslim_mega.engine.megatron.mapping import MissingTensorError, ShapeMismatchError, rules  # noqa: E402

from .tiny_hf import save_causal_lm, save_reward_model  # noqa: E402


def _hf_tensors(path):
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return load_file(path / "model.safetensors")
    out = {}
    for f in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(path / f))
    return out


def _assert_same_tensors(a, b):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("arch, tied, flags", [
    ("llama", False, ["--tp", "2"]), ("llama", True, ["--pp", "2"]),
    ("qwen2", True, ["--tp", "2", "--pp", "2"]), ("qwen2", False, ["--dtype", "bf16"]),
    ("qwen2_moe", False, ["--ep", "2"]), ("qwen2_moe", True, ["--tp", "2", "--pp", "2", "--ep", "2", "--vpp", "2"]),
])
def test_cli_round_trip_is_bit_exact(tmp_path, capsys, arch, tied, flags):
    src = save_causal_lm(arch, tmp_path / "hf", tied=tied)
    assert main(["convert", "hf-to-megatron", "--hf", str(src), "--out", str(tmp_path / "mg"), *flags]) == 0
    assert main(["convert", "megatron-to-hf", "--ckpt", str(tmp_path / "mg"), "--out", str(tmp_path / "back")]) == 0
    assert "converted causal_lm" in capsys.readouterr().out
    want = _hf_tensors(src)
    if "bf16" in flags:
        want = {k: v.to(torch.bfloat16) for k, v in want.items()}
    _assert_same_tensors(want, _hf_tensors(tmp_path / "back"))
    config = json.loads((src / "config.json").read_text())
    if "bf16" in flags:
        config["dtype"] = "bfloat16"  # the config states the dtype the weights now have
    assert json.loads((tmp_path / "back/config.json").read_text()) == config
    # The checkpoint holds megatron-core's keys with the layer (expert) axes in front.
    shapes = dist_ckpt.tensor_shapes(tmp_path / "mg/release")
    assert shapes["decoder.layers.self_attention.linear_qkv.weight"] == (4, (4 + 2 * 2) * 4, 16)
    assert shapes["embedding.word_embeddings.weight"] == (128, 16)
    assert ("output_layer.weight" in shapes) == (not tied)
    if arch == "qwen2_moe":
        assert shapes["decoder.layers.mlp.experts.experts.linear_fc1.weight"] == (4, 4, 16, 16)


def test_reward_model_round_trip_loads_and_scores_the_same(tmp_path):
    from moslim_mega.reward.io import load_reward_model

    src = save_reward_model("qwen2", tmp_path / "rm")
    hf_to_megatron(src, tmp_path / "mg", Layout(tp=2, pp=2))
    shapes = dist_ckpt.tensor_shapes(tmp_path / "mg/release")
    assert shapes["reward_heads.weight"] == (7, 16) and "output_layer.weight" not in shapes
    megatron_to_hf(tmp_path / "mg", tmp_path / "back")
    _assert_same_tensors(_hf_tensors(src / "backbone"), _hf_tensors(tmp_path / "back/backbone"))
    _assert_same_tensors(load_file(src / "heads.safetensors"), load_file(tmp_path / "back/heads.safetensors"))
    for name in ("rm.json", "mapping_stats.json"):
        assert (tmp_path / "back" / name).read_text() == (src / name).read_text()
    a, b = load_reward_model(src), load_reward_model(tmp_path / "back")
    prompts, responses = ["a b c", "d e"], ["f g", "h"]
    for pa, pb in zip(a.probs(prompts, responses), b.probs(prompts, responses)):
        assert torch.equal(pa, pb)


def test_hf_output_is_sharded_with_an_index_when_asked(tmp_path):
    src = save_causal_lm("qwen2_moe", tmp_path / "hf")
    hf_to_megatron(src, tmp_path / "mg")
    megatron_to_hf(tmp_path / "mg", tmp_path / "back", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "back/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    _assert_same_tensors(_hf_tensors(src), _hf_tensors(tmp_path / "back"))
    # ...and a sharded HF directory converts too.
    hf_to_megatron(tmp_path / "back", tmp_path / "mg2")
    assert dist_ckpt.tensor_shapes(tmp_path / "mg2/release") == dist_ckpt.tensor_shapes(tmp_path / "mg/release")


def test_writing_streams_one_tensor_at_a_time(tmp_path):
    """At most two made tensors are alive at once (the one being written and its predecessor,
    still bound in DCP's loop) out of dozens: the checkpoint is never whole in memory."""
    src = save_causal_lm("qwen2_moe", tmp_path / "hf")
    config = json.loads((src / "config.json").read_text())
    dims = model_dims(config)
    source = HFTensorSource(src)
    alive, peak, calls = [], [0], [0]

    def get_whole(rule, layer, expert):
        from moslim_mega.engine.megatron.mapping import to_megatron

        names = rule.hf_names(dims, layer, expert)
        t = to_megatron(rule, dims, [source.get(n) for n in names], names).clone()
        alive.append(weakref.ref(t))
        peak[0] = max(peak[0], sum(r() is not None for r in alive))
        calls[0] += 1
        return t

    rule_list = rules(dims)
    dist_ckpt.save_streaming(tmp_path / "ck", dims, rule_list, torch.float32, get_whole)
    assert calls[0] > 50 and peak[0] <= 2


def test_errors_name_the_problem(tmp_path, capsys):
    src = save_causal_lm("llama", tmp_path / "hf")
    tensors = load_file(src / "model.safetensors")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    from safetensors.torch import save_file

    save_file({k: v for k, v in tensors.items() if k != "model.layers.2.mlp.up_proj.weight"}, broken / "model.safetensors")
    with pytest.raises(MissingTensorError, match="model.layers.2.mlp.up_proj.weight is missing"):
        hf_to_megatron(broken, tmp_path / "o1")
    save_file({**tensors, "model.layers.1.self_attn.k_proj.weight": torch.zeros(9, 16)}, broken / "model.safetensors")
    with pytest.raises(ShapeMismatchError, match=r"model.layers.1.self_attn.k_proj.weight has shape \(9, 16\)"):
        hf_to_megatron(broken, tmp_path / "o1b")
    assert not (tmp_path / "o1b").exists()  # refused before anything was written
    save_file({**tensors, "model.layers.0.self_attn.q_norm.weight": torch.ones(4)}, broken / "model.safetensors")
    with pytest.raises(ConversionError, match="q_norm.weight has no Megatron mapping"):
        hf_to_megatron(broken, tmp_path / "o2")
    config = json.loads((src / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    assert main(["convert", "hf-to-megatron", "--hf", str(broken), "--out", str(tmp_path / "o3")]) == 2
    assert "model_type='gemma'" in capsys.readouterr().err
    hf_to_megatron(src, tmp_path / "mg")
    assert main(["convert", "hf-to-megatron", "--hf", str(src), "--out", str(tmp_path / "mg")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", "megatron-to-hf", "--ckpt", str(src), "--out", str(tmp_path / "o4")]) == 2
    assert "moslim_megatron.json" in capsys.readouterr().err
