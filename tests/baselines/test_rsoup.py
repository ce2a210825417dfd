"""Rewarded Soups (Eq. 2): the safetensors-level merge equals a hand interpolation."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moslim_mega.baselines.common import BaselineError
from moslim_mega.baselines.rsoup import lambda_grid, merge_safetensors, merge_state_dicts, safetensors_layout
from moslim_mega.config import ModelConfig
from moslim_mega.models.build import build_causal_lm, build_tokenizer

MC = ModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)


def _two_models(tmp_path, shard: str | None = None):
    tok = build_tokenizer(MC)
    models, dirs = [], []
    for seed in (1, 2):
        m = build_causal_lm(MC, tok, seed)
        d = tmp_path / f"m{seed}"
        kw = {"max_shard_size": shard} if shard else {}
        m.save_pretrained(d, safe_serialization=True, **kw)
        tok.save_pretrained(d)
        models.append(m)
        dirs.append(d)
    return models, dirs


def test_state_dict_merge_is_the_hand_interpolation():
    a = {"w": torch.randn(3, 4), "b": torch.randn(4), "ids": torch.arange(5)}
    b = {"w": torch.randn(3, 4), "b": torch.randn(4), "ids": torch.arange(5)}
    merged = merge_state_dicts([a, b], [0.3, 0.7])
    torch.testing.assert_close(merged["w"], 0.3 * a["w"] + 0.7 * b["w"])
    torch.testing.assert_close(merged["b"], 0.3 * a["b"] + 0.7 * b["b"])
    assert torch.equal(merged["ids"], a["ids"])


@pytest.mark.parametrize("shard", [None, "40KB"])
def test_safetensors_merge_equals_hand_interpolation_of_two_models(tmp_path, shard):
    (m1, m2), dirs = _two_models(tmp_path, shard)
    if shard:
        assert (dirs[0] / "model.safetensors.index.json").is_file()
        assert len(safetensors_layout(dirs[0])) > 1  # really sharded
    lam = 0.25
    out = merge_safetensors(dirs, [lam, 1 - lam], tmp_path / "soup")
    merged = AutoModelForCausalLM.from_pretrained(out)
    s1, s2, sm = m1.state_dict(), m2.state_dict(), merged.state_dict()
    assert set(sm) == set(s1)
    for k in s1:
        torch.testing.assert_close(sm[k], lam * s1[k] + (1 - lam) * s2[k], rtol=0, atol=1e-6)
    # The merged checkpoint answers like a module holding the hand-interpolated weights.
    hand = build_causal_lm(MC, build_tokenizer(MC), 0)
    hand.load_state_dict({k: lam * s1[k] + (1 - lam) * s2[k] for k in s1})
    ids = torch.tensor([[3, 5, 7, 9]])
    torch.testing.assert_close(merged(ids).logits, hand(ids).logits, rtol=0, atol=1e-5)
    if shard:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(s1)


def test_merge_endpoints_reproduce_each_policy(tmp_path):
    (m1, _), dirs = _two_models(tmp_path)
    out = AutoModelForCausalLM.from_pretrained(merge_safetensors(dirs, [1.0, 0.0], tmp_path / "e"))
    for k, v in m1.state_dict().items():
        assert torch.equal(out.state_dict()[k], v)


def test_bad_merges_name_the_problem(tmp_path):
    a = {"w": torch.zeros(2)}
    with pytest.raises(BaselineError, match="sum to 1"):
        merge_state_dicts([a, a], [0.5, 0.6])
    with pytest.raises(BaselineError, match="'v'"):
        merge_state_dicts([a, {"v": torch.zeros(2)}], [0.5, 0.5])
    with pytest.raises(BaselineError, match="shapes"):
        merge_state_dicts([a, {"w": torch.zeros(3)}], [0.5, 0.5])
    with pytest.raises(BaselineError, match="no \\*.safetensors"):
        merge_safetensors([tmp_path, tmp_path], [0.5, 0.5], tmp_path / "o")


def test_lambda_grid_walks_from_one_policy_to_the_other():
    assert lambda_grid(3, 0, 2, 3) == [(1.0, 0.0, 0.0), (0.5, 0.0, 0.5), (0.0, 0.0, 1.0)]
