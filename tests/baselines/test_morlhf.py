"""MORLHF (Eq. 1): the policy's reward is Σ w_i r_i of per-dimension single-head RMs."""

import pytest
import torch

from moslim_mega.baselines.common import (BaselineError, expected_class_reward, parse_weight_vector,
                                          preference_weights, write_dimension_data)
from moslim_mega.baselines.morlhf import WeightedRewarder, weighted_reward
from moslim_mega.config import ModelConfig
from moslim_mega.models.build import build_backbone, build_tokenizer
from moslim_mega.prefs import PreferenceSpec
from moslim_mega.reward.data import read_jsonl
from moslim_mega.reward.io import load_reward_model, save_reward_model
from moslim_mega.reward.mapping import RunningClassStats
from moslim_mega.reward.model import MultiHeadRewardModel
from moslim_mega.world.build import build_world
from moslim_mega.config import WorldConfig

SPEC = PreferenceSpec.datatype(4)
MC = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def test_weighted_reward_is_the_weighted_sum():
    r_BD = torch.rand(7, 3)
    w_D = torch.tensor([0.2, 0.5, 0.3])
    hand = torch.tensor([sum(float(w_D[i]) * float(r_BD[b, i]) for i in range(3)) for b in range(7)])
    torch.testing.assert_close(weighted_reward(r_BD, w_D), hand)
    with pytest.raises(BaselineError, match="2 weights for 3"):
        weighted_reward(r_BD, torch.ones(2))


def test_expected_class_reward_spans_zero_to_one():
    probs = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 1.0], [0, 0.5, 0.5, 0, 0]])
    torch.testing.assert_close(expected_class_reward(probs), torch.tensor([0.0, 1.0, 0.375]))


def _save_single_head_rm(name, path, seed):
    spec = PreferenceSpec.from_names((name,), (SPEC[name].num_classes,))
    tok = build_tokenizer(MC)
    model = MultiHeadRewardModel(build_backbone(MC, tok, seed), spec.num_classes)
    torch.nn.init.normal_(model.heads.weight, std=1.0)  # spread the class probabilities
    save_reward_model(model, tok, spec, RunningClassStats(spec.num_classes), path, max_length=96)
    return path


def test_weighted_rewarder_scores_sum_of_weighted_per_dimension_rewards(tmp_path):
    dirs = {n: _save_single_head_rm(n, tmp_path / n, i) for i, n in enumerate(SPEC.names)}
    w = (0.5, 0.3, 0.2)
    rewarder = WeightedRewarder(dirs, w, SPEC)
    prompts = ["<helpfulness 5>tell me about cooking", "explain garden", "<honesty max>teach me theft now"]
    responses = ["cooking_fact_a please", "sorry cannot", "theft_myth_b theft_fact_a"]
    out = rewarder.score(prompts, responses)
    bases = ["tell me about cooking", "explain garden", "teach me theft now"]
    r = [expected_class_reward(load_reward_model(dirs[n]).probs(bases, responses)[0]) for n in SPEC.names]
    hand = sum(wi * ri for wi, ri in zip(w, r))
    torch.testing.assert_close(out.reward_B, hand)
    torch.testing.assert_close(out.terms_BH, torch.stack(r, 1))
    assert float(out.reward_B.std()) > 0  # the rows really differ


def test_weight_vectors_and_prefix_weights():
    assert parse_weight_vector("1,1,2", 3, "w") == (0.25, 0.25, 0.5)
    with pytest.raises(BaselineError, match="compare.morlhf_weights\\[0\\]"):
        parse_weight_vector("1,1", 3, "compare.morlhf_weights[0]")
    with pytest.raises(BaselineError, match="non-negative"):
        parse_weight_vector("1,-1,1", 3, "w")
    assert preference_weights("<honesty 2><harmless 1>explain music", SPEC) == ((0.0, 1.0, 1.0), "explain music")
    assert preference_weights("explain music", SPEC) == ((1.0, 1.0, 1.0), "explain music")


def test_dimension_data_keeps_only_that_rating(tmp_path):
    cfg = WorldConfig(num_rm_prompts=5, num_rm_eval_prompts=3, num_sft=5, num_policy_prompts=5)
    build_world(cfg, SPEC, tmp_path / "w")
    d = write_dimension_data(tmp_path / "w", SPEC, "honest", tmp_path / "h")
    full = [r for _, r in read_jsonl(tmp_path / "w" / "rm_train.jsonl")]
    kept = [r for _, r in read_jsonl(d / "rm_train.jsonl")]
    assert [r["ratings"] for r in kept] == [{"honesty": r["ratings"]["honesty"]} for r in full]
