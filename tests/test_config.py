"""The config tree: YAML recipes, ``a.b=value`` overrides, validation and saving (config.py)."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from moslim_mega.config import (
    Config,
    ConfigError,
    PrefsConfig,
    RewardConfig,
    field_docs,
    load_config,
    missing_docs,
    save_config,
    to_dict,
)


def write(tmp_path, text: str, name: str = "recipe.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.rm.loss == "per_head_ce" and cfg.prefs.datatype == 4 and cfg.prefs.dimensions == ()


def test_load_yaml_file(tmp_path):
    path = write(
        tmp_path,
        """
run:
  seed: 3
  tensorboard: false
prefs:
  dimensions: [helpfulness, honesty, politeness]
  num_classes: [5, 3, 2]
rm:
  lr: 3.0e-4
  batch_size: 16
  loss: paper_eq10
  epochs: 2
world:
  harmful_fraction: 0.5
""",
    )
    cfg = load_config(path)
    assert cfg.run.seed == 3 and cfg.run.tensorboard is False
    assert cfg.prefs.dimensions == ("helpfulness", "honesty", "politeness")
    assert cfg.prefs.num_classes == (5, 3, 2)
    assert cfg.rm.lr == pytest.approx(3e-4) and isinstance(cfg.rm.lr, float)
    assert cfg.rm.batch_size == 16 and cfg.rm.loss == "paper_eq10"
    assert cfg.rm.epochs == 2.0 and isinstance(cfg.rm.epochs, float)  # int accepted for a float
    assert cfg.world.harmful_fraction == 0.5
    # untouched fields keep their defaults
    assert cfg.rm.warmup_steps == RewardConfig().warmup_steps and cfg.rm.model == Config().rm.model


def test_empty_yaml_file_is_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()


def test_overrides_coerce_types():
    cfg = load_config(
        overrides=[
            "rm.batch_size=8",
            "rm.lr=0.5",
            "rm.weight_decay=1e-4",  # YAML 1.1 reads this as a string; still a float
            "rm.calibrate=false",
            "run.tensorboard=True",
            "run.seed=-2",
            "prefs.dimensions=[helpfulness,honesty]",
            "prefs.num_classes=[5, 3]",
            "rm.model.name_or_path=tiny-qwen2",
            "world.harmful_fraction=1",
        ]
    )
    assert cfg.rm.batch_size == 8 and type(cfg.rm.batch_size) is int
    assert cfg.rm.lr == 0.5
    assert cfg.rm.weight_decay == pytest.approx(1e-4) and isinstance(cfg.rm.weight_decay, float)
    assert cfg.rm.calibrate is False and cfg.run.tensorboard is True
    assert cfg.run.seed == -2
    assert cfg.prefs.dimensions == ("helpfulness", "honesty")
    assert cfg.prefs.num_classes == (5, 3) and all(type(k) is int for k in cfg.prefs.num_classes)
    assert cfg.rm.model.name_or_path == "tiny-qwen2"
    assert cfg.world.harmful_fraction == 1.0 and isinstance(cfg.world.harmful_fraction, float)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("prefs.dimensions=helpfulness,honesty", ("helpfulness", "honesty")),
        ("prefs.dimensions=[ helpfulness , honesty ]", ("helpfulness", "honesty")),
        ("prefs.dimensions=[]", ()),
        ("prefs.dimensions=helpfulness", ("helpfulness",)),
    ],
)
def test_list_override_spellings(text, expected):
    assert load_config(overrides=[text]).prefs.dimensions == expected


@pytest.mark.parametrize("raw", ["yes", "no", "1", "0", "true", "FALSE"])
def test_bool_override_spellings(raw):
    assert load_config(overrides=[f"rm.calibrate={raw}"]).rm.calibrate is (raw.lower() in ("yes", "1", "true"))


def test_string_field_keeps_numeric_looking_text():
    cfg = load_config(overrides=["run.data_dir=2024", "rm.model.name_or_path=1.50"])
    assert cfg.run.data_dir == "2024" and cfg.rm.model.name_or_path == "1.50"
    assert load_config(overrides=['run.data_dir="my data"']).run.data_dir == "my data"


def test_overrides_win_over_the_file(tmp_path):
    path = write(tmp_path, "rm:\n  lr: 0.1\n  batch_size: 4\n")
    cfg = load_config(path, ["rm.lr=0.2"])
    assert cfg.rm.lr == 0.2 and cfg.rm.batch_size == 4
    # later overrides win over earlier ones
    assert load_config(overrides=["rm.lr=0.1", "rm.lr=0.3"]).rm.lr == 0.3


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["foo=1"], "'foo'"),
        (["rm.foo=1"], "'rm.foo'"),
        (["rm.lr_max=1"], "'rm.lr_max'"),
        (["world.seeds=1"], "'world.seeds'"),
        (["rm.foo.bar=1"], "'rm.foo'"),
    ],
)
def test_unknown_override_keys(overrides, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=overrides)
    assert key in str(info.value)


def test_unknown_keys_in_file(tmp_path):
    with pytest.raises(ConfigError, match="'mapping.kindd'"):
        load_config(write(tmp_path, "mapping:\n  kindd: zscore\n"))
    with pytest.raises(ConfigError, match="'optimizer'"):
        load_config(write(tmp_path, "optimizer:\n  lr: 1\n"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("rm.lr=abc", "rm.lr"),
        ("rm.batch_size=1.5", "rm.batch_size"),
        ("rm.batch_size=abc", "rm.batch_size"),
        ("rm.batch_size=true", "rm.batch_size"),
        ("rm.calibrate=maybe", "rm.calibrate"),
        ("rm.calibrate=2", "rm.calibrate"),
        ("rm.lr=[1, 2]", "rm.lr"),
        ("prefs.num_classes=[5,x]", "prefs.num_classes[1]"),
        ("prefs.datatype=2.0", "prefs.datatype"),
        ("rm=3", "rm"),
    ],
)
def test_wrong_types(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=[override])
    assert str(info.value).startswith(key + ":") or f"'{key}'" in str(info.value)


def test_wrong_types_in_file(tmp_path):
    with pytest.raises(ConfigError, match="rm.model.name_or_path"):
        load_config(write(tmp_path, "rm:\n  model:\n    name_or_path: [a, b]\n"))
    with pytest.raises(ConfigError, match="rm: expected a mapping"):
        load_config(write(tmp_path, "rm: 3\n"))
    with pytest.raises(ConfigError, match="top level"):
        load_config(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize(
    "override, key",
    [
        ("rm.loss=foo", "rm.loss"),
        ("rm.class_weights=inverse", "rm.class_weights"),
        ("rm.stats_mode=running", "rm.stats_mode"),
        ("mapping.kind=linear", "mapping.kind"),
        ("mapping.normalize_by=some", "mapping.normalize_by"),
        ("rm.model.dtype=float16", "rm.model.dtype"), ("policy.algo=ppo2", "policy.algo"), ("sft.model.dtype=half", "sft.model.dtype"),
    ],
)
def test_invalid_choices(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=[override])


def test_valid_choices():
    cfg = load_config(overrides=["rm.loss=paper_eq10", "mapping.kind=neg_abs_dist", "rm.model.dtype=bfloat16"])
    assert (cfg.rm.loss, cfg.mapping.kind, cfg.rm.model.dtype) == ("paper_eq10", "neg_abs_dist", "bfloat16")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="a.b=value"):
        load_config(overrides=["rm.lr"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(overrides=["rm.lr=0.1", "rm.lr.x=2"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)  # a directory is not a recipe


def test_save_and_load_back(tmp_path):
    cfg = load_config(
        overrides=[
            "prefs.dimensions=[politeness,conciseness]",
            "prefs.num_classes=[4,2]",
            "rm.lr=1.5e-3",
            "rm.calibrate=false",
            "run.data_dir=2024",
            "world.num_sft=17",
        ]
    )
    path = save_config(cfg, tmp_path / "run" / "nested")
    assert path == tmp_path / "run" / "nested" / "config.yaml" and path.is_file()
    again = load_config(path)
    assert again == cfg
    assert yaml.safe_load(path.read_text()) == to_dict(cfg)
    assert to_dict(cfg)["prefs"]["dimensions"] == ["politeness", "conciseness"]  # plain lists
    assert load_config(save_config(Config(), tmp_path)) == Config()


def test_every_field_is_documented():
    assert missing_docs() == []
    rows = field_docs()
    keys = [key for key, *_ in rows]
    assert "rm.lr" in keys and "prefs.dimensions" in keys and "mapping.std_floor" in keys
    assert len(keys) == len(set(keys))
    # every leaf of the tree (nested sections included) appears once
    def leaves(d, prefix=""):
        for k, v in d.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]

    assert set(keys) == set(leaves(to_dict(Config())))
    assert "rm.model.hidden_size" in keys and "policy.kl_coef" in keys


def test_configs_are_frozen():
    cfg = load_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rm = RewardConfig()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rm.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        PrefsConfig().datatype = 2  # type: ignore[misc]
    # frozen configs are hashable values
    assert hash(load_config()) == hash(Config())
