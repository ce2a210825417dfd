"""build_rollout_engine: the one factory of every call site."""

import sys

import pytest

from moslim_mega.config import ConfigError, ModelConfig, RolloutConfig, load_config
from moslim_mega.models.build import build_causal_lm, build_tokenizer
from moslim_mega.rollout import HFEngine, build_rollout_engine

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)


def test_hf_engine_generates_with_the_given_module():
    tok = build_tokenizer(ModelConfig())
    model = build_causal_lm(TINY, tok, seed=0)
    engine = build_rollout_engine(RolloutConfig(), model=model, tokenizer=tok, model_dir=None)
    assert isinstance(engine, HFEngine) and engine.model is model and engine.name == "hf"


def test_missing_vllm_is_a_config_error_saying_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "moslim_mega.rollout.vllm", None)  # import → ImportError
    with pytest.raises(ConfigError, match=r"rollout.engine=vllm: .*pip install -e \.\[vllm\]"):
        build_rollout_engine(RolloutConfig(engine="vllm"), model=None, tokenizer=None, model_dir="x")


def test_hf_without_a_module_is_refused():
    with pytest.raises(ConfigError, match="rollout.engine=hf"):
        build_rollout_engine(RolloutConfig(), model=None, tokenizer=build_tokenizer(ModelConfig()), model_dir="x")


@pytest.mark.parametrize("override, match", [
    ("rollout.engine=sglang", "rollout.engine"),
    ("rollout.sleep_level=3", "rollout.sleep_level"),
    ("rollout.push_bucket_mb=0", "rollout.push_bucket_mb"),
    ("policy.rollout_correction=tis", "policy.rollout_correction"),
    ("policy.rollout_correction_cap=0.5", "policy.rollout_correction_cap"),
])
def test_bad_rollout_config_values_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])
