"""A tiny embedded world, SFT policy and multi-head RM, built once per test module that needs a
trained starting point for policy runs (policy, checkpoint tests)."""

from pathlib import Path

from moslim_mega.config import WorldConfig, load_config
from moslim_mega.prefs import PreferenceSpec
from moslim_mega.reward.trainer import train_reward_model
from moslim_mega.sft import train_sft
from moslim_mega.world.build import build_world


def build_tiny_stage(root: Path, overrides: list[str]) -> dict:
    """World (64 SFT pairs, 16×4 RM pairs, 20 policy prompts) → SFT → RM under ``overrides``.
    Returns the overrides extended with the run's data dir, the world paths and the model dirs."""
    world_cfg = WorldConfig(num_sft=64, num_rm_prompts=16, num_rm_eval_prompts=4, num_policy_prompts=20)
    paths = build_world(world_cfg, PreferenceSpec.datatype(4), root / "world")
    overrides = list(overrides) + [f"run.data_dir={root / 'world'}"]
    cfg = load_config(None, overrides)
    sft = train_sft(cfg, paths["sft"], root / "sft", show_progress=False)
    train_reward_model(cfg, root / "rm", show_progress=False)
    return {"overrides": overrides, "paths": paths, "sft_dir": sft["model_dir"], "rm_dir": root / "rm"}
