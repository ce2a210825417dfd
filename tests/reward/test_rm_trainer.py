"""End-to-end reward-model training on the embedded world (CPU, small)."""

import json
from pathlib import Path

import pytest
import torch

from moslim_mega.config import load_config
from moslim_mega.models.build import build_tokenizer
from moslim_mega.prefs import PreferenceSpec
from moslim_mega.reward.data import load_rm_examples
from moslim_mega.reward.io import load_reward_model
from moslim_mega.reward.trainer import TrainingError, predict_probs, train_reward_model

SMALL = [
    "world.num_rm_prompts=400",
    "world.num_rm_eval_prompts=60",
    "rm.model.hidden_size=64",
    "rm.model.intermediate_size=128",
    "rm.epochs=1",
    "rm.eval_every=10",
    "rm.warmup_steps=5",
    "run.tensorboard=true",
]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rm")
    cfg = load_config(None, SMALL)
    report = train_reward_model(cfg, out, show_progress=False)
    return cfg, out, report


def test_run_directory_has_model_stats_metrics_and_config(small_run):
    _cfg, out, report = small_run
    for name in ("rm.json", "heads.safetensors", "mapping_stats.json", "config.yaml", "eval.json", "backbone/config.json"):
        assert (out / name).exists(), name
    assert any((out / "tensorboard").iterdir())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tags = {r["tag"] for r in rows}
    assert {"train", "eval", "final"} <= tags
    assert all("loss" in r for r in rows if r["tag"] == "train")
    assert set(report["heads"]) == {"helpfulness", "honesty", "harmlessness"}
    assert load_config(out / "config.yaml") == _cfg


def test_small_run_learns_every_head(small_run):
    """One epoch on 400 prompts already beats the constant guess on every head and orders the
    responses of a prompt. Measured (seeds 0-2): intensity accuracy − majority rate ≥ 0.22 /
    0.12 / 0.17 (helpfulness / honesty / harmlessness), pairwise ≥ 0.90; the same run with
    rm.lr=0 stays below the majority rate and at pairwise 0.42-0.62."""
    _cfg, _out, report = small_run
    for name, head in report["heads"].items():
        assert head["intensity_accuracy"] > head["majority_rate"] + 0.06, (name, head["intensity_accuracy"])
    for name in ("helpfulness", "honesty"):
        assert report["heads"][name]["pairwise_accuracy"] >= 0.8, name


def test_saved_model_reloads_with_identical_outputs(small_run):
    cfg, out, _ = small_run
    rm = load_reward_model(out)
    tok = build_tokenizer(cfg.rm.model)
    data = load_rm_examples(out / "data" / "rm_eval.jsonl", PreferenceSpec.datatype(4), tok, cfg.rm.max_length)
    via_loader = rm.probs(data.prompts[:32], data.responses[:32])
    direct = predict_probs(rm.model, data, tok.pad_token_id)
    for a, b in zip(via_loader, direct):
        assert torch.allclose(a, b[:32], atol=1e-6)
    assert rm.stats.count == 400 * 4  # calibration pass over the whole training set


def test_diverging_run_stops_with_the_step_and_quantity_named(tmp_path):
    cfg = load_config(None, SMALL + ["rm.lr=1e30", "rm.grad_clip=0", "rm.warmup_steps=0", "run.tensorboard=false"])
    with pytest.raises(TrainingError, match=r"step \d+: rm (loss|gradient norm) is not finite"):
        train_reward_model(cfg, tmp_path, show_progress=False)


def test_paper_eq10_loss_option_trains(tmp_path):
    """Eq. 10 pools the heads' classes, so its per-head accuracies stay near chance (why it is only an
    ablation); what must hold is that its own objective goes down. Measured over 25 steps
    (seeds 0-2): the logged loss drops by 0.70 / 1.31 / 0.75; with rm.lr=0 it rises by 0.07-0.11."""
    cfg = load_config(None, SMALL + ["rm.loss=paper_eq10", "rm.eval_every=0", "run.tensorboard=false"])
    report = train_reward_model(cfg, tmp_path, show_progress=False)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["tag"] == "train"]
    assert report["steps"] == 25 and len(losses) == 3  # logged at steps 0, 10, 20
    assert losses[-1] < losses[0] - 0.4, losses


@pytest.mark.slow
def test_world_recipe_reaches_the_acceptance_bar(tmp_path):
    """Issue 2's bar with the shipped recipe:
    intensity accuracy clearly above the majority rate on every head, pairwise ≥ 0.8 on
    helpfulness and honesty, and the mapped reward ranks on-target responses first ≥ 80 %."""
    cfg = load_config(Path(__file__).parents[2] / "configs" / "rm_world.yaml", ["run.tensorboard=false"])
    report = train_reward_model(cfg, tmp_path, show_progress=False)
    for name, head in report["heads"].items():
        assert head["intensity_accuracy"] > head["majority_rate"] + 0.1, name
        assert head["mapping_accuracy"] >= 0.8, name
    for name in ("helpfulness", "honesty"):
        assert report["heads"][name]["pairwise_accuracy"] >= 0.8
