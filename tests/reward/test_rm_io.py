"""The RM directory records the input the RM was trained on (truncation, chat template) and the
loader scores with it: no silent default length."""

import json

import pytest
import yaml

from moslim_mega.config import ModelConfig
from moslim_mega.models.build import build_backbone, build_tokenizer
from moslim_mega.prefs import PreferenceSpec
from moslim_mega.reward.io import RewardModelLoadError, load_reward_model, save_reward_model
from moslim_mega.reward.mapping import RunningClassStats
from moslim_mega.reward.model import MultiHeadRewardModel

SPEC = PreferenceSpec.datatype(4)
TINY = ModelConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)


@pytest.fixture
def rm_dir(tmp_path):
    tok = build_tokenizer(TINY, SPEC.names)
    model = MultiHeadRewardModel(build_backbone(TINY, tok, seed=0), SPEC.num_classes)
    return save_reward_model(model, tok, SPEC, RunningClassStats(SPEC.num_classes), tmp_path / "rm", max_length=7)


def _edit_meta(rm_dir, **changes):
    meta = json.loads((rm_dir / "rm.json").read_text())
    meta.update(changes)
    (rm_dir / "rm.json").write_text(json.dumps({k: v for k, v in meta.items() if v is not None}))


def test_loader_uses_the_recorded_length_unless_overridden(rm_dir):
    meta = json.loads((rm_dir / "rm.json").read_text())
    assert meta["max_length"] == 7 and meta["chat_template"]  # the world tokenizer has a template
    rm = load_reward_model(rm_dir)
    assert rm.max_length == 7
    (_, ids_BT, _), = rm._batches(["what about cooking now"], ["cooking_fact_a please"], 8)
    assert ids_BT.shape == (1, 7)
    assert load_reward_model(rm_dir, max_length=0).max_length == 0  # explicit: no truncation
    with pytest.raises(RewardModelLoadError, match="max_length=-1"):
        load_reward_model(rm_dir, max_length=-1)
    # weights=False (the policy's pipelined RM builds the model itself): all the rest, no model.
    bare = load_reward_model(rm_dir, weights=False)
    assert bare.model is None and bare.max_length == 7 and bare.spec == rm.spec
    assert bare.stats.num_classes == rm.stats.num_classes and bare.tokenizer.chat_template == rm.tokenizer.chat_template


def test_an_old_directory_takes_the_length_from_its_config_or_refuses(rm_dir):
    _edit_meta(rm_dir, max_length=None, chat_template=None)  # as written before the record existed
    with pytest.raises(RewardModelLoadError, match="no max_length.*pass max_length= explicitly"):
        load_reward_model(rm_dir)
    (rm_dir / "config.yaml").write_text(yaml.safe_dump({"rm": {"max_length": 33}}))  # the trainer's copy
    assert load_reward_model(rm_dir).max_length == 33
    assert load_reward_model(rm_dir, max_length=5).max_length == 5
    (rm_dir / "config.yaml").write_text(yaml.safe_dump({"rm": {"max_length": "long"}}))
    with pytest.raises(RewardModelLoadError, match="rm.max_length='long'"):
        load_reward_model(rm_dir)


def test_a_tokenizer_whose_template_differs_from_the_record_is_refused(rm_dir):
    _edit_meta(rm_dir, chat_template="{{ messages }}")
    with pytest.raises(RewardModelLoadError, match="chat template differs"):
        load_reward_model(rm_dir)
