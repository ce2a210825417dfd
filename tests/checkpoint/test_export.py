"""`moslim export hf`: training checkpoints → HF directories that plain transformers / the
documented RM loader read, with the trainer's numbers."""

import copy
import json

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

from moslim_mega.algos.logprob import sequence_logprobs
from moslim_mega.checkpoint.manager import CheckpointManager
from moslim_mega.cli import main as cli_main
from moslim_mega.config import load_config
from moslim_mega.models.value import ValueModel
from moslim_mega.policy.controller import train_policy
from moslim_mega.reward import load_reward_model
from moslim_mega.reward.trainer import train_reward_model
from moslim_mega.models.build import load_policy
from moslim_mega.utils.optim import Updater


def _cfg(stage, *extra):
    return load_config(None, stage["overrides"] + list(extra))


def _run(fn, *args, **kw):
    threads = torch.get_num_threads()
    try:
        return fn(*args, show_progress=False, **kw)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ppo_run(stage, tmp_path_factory):
    """4 PPO steps with a checkpoint every 2 (the last one is the final policy)."""
    out = tmp_path_factory.mktemp("ppo_export")
    cfg = _cfg(stage, "policy.algo=ppo", "policy.steps=4", "checkpoint.every=2")
    _run(train_policy, cfg, out, cfg.policy.init, cfg.policy.rm_dir, cfg.policy.prompts)
    return cfg, out


def _batch(tokenizer):
    texts = ["<helpfulness 5> tell me about cats", "explain cooking please", "<honesty 1> hi"]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.slow
def test_exported_policy_loads_in_plain_transformers_with_the_trainers_logits(ppo_run, tmp_path, capsys):
    cfg, run = ppo_run
    assert cli_main(["export", "hf", "--ckpt", str(run / "ckpt"), "--out", str(tmp_path / "hf")]) == 0
    assert "model 'actor'" in capsys.readouterr().out  # the only causal LM of a PPO checkpoint
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()

    # The trainer's side: its actor module restored from the same checkpoint by the resume path.
    actor, tokenizer = load_policy(cfg.policy.init)
    actor_upd = Updater(actor.parameters(), 1e-3, 0.0, 1, 1.0)
    critic = ValueModel(copy.deepcopy(actor.model))
    critic_upd = Updater(critic.parameters(), 1e-3, 0.0, 1, 1.0)
    CheckpointManager(cfg.checkpoint, run).load(
        run / "ckpt" / "step_4", {"actor": actor, "critic": critic},
        {"actor": (actor, actor_upd.opt), "critic": (critic, critic_upd.opt)})
    actor.eval()

    ids_BT, mask_BT = _batch(tokenizer)
    with torch.no_grad():
        ours = actor(input_ids=ids_BT, attention_mask=mask_BT).logits
        theirs = exported(input_ids=ids_BT, attention_mask=mask_BT).logits
        lp_ours, _ = sequence_logprobs(actor, ids_BT, mask_BT)
        lp_theirs, _ = sequence_logprobs(exported, ids_BT, mask_BT)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (lp_ours - lp_theirs).abs().max().item() <= 1e-5
    # It is the trained actor (= the run's final policy), not the initial one.
    final = AutoModelForCausalLM.from_pretrained(run / "policy").state_dict()
    init = AutoModelForCausalLM.from_pretrained(cfg.policy.init).state_dict()
    got = exported.state_dict()
    assert all(torch.equal(final[k], got[k]) for k in final)
    assert not torch.equal(init["lm_head.weight"], got["lm_head.weight"])
    _m, tok = load_policy(tmp_path / "hf")  # tokenizer (with chat template) exported beside it
    assert tok.chat_template and tok.pad_token_id is not None


def test_export_names_the_problem(ppo_run, tmp_path, capsys):
    _cfg_, run = ppo_run
    assert cli_main(["export", "hf", "--ckpt", str(run / "ckpt"), "--out", str(tmp_path / "x"), "--model", "critic"]) == 2
    assert "'critic': a value model" in capsys.readouterr().err
    assert cli_main(["export", "hf", "--ckpt", str(run / "ckpt"), "--out", str(tmp_path / "x"), "--model", "nope"]) == 2
    assert "['actor', 'critic']" in capsys.readouterr().err
    assert cli_main(["export", "hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_exported_reward_model_reloads_with_identical_heads_and_statistics(stage, tmp_path):
    # 8 steps, a checkpoint at the last one, no calibration: the RM the trainer saves at the end
    # is exactly the checkpointed one, statistics included.
    cfg = _cfg(stage, "checkpoint.every=8", "rm.calibrate=false")
    _run(train_reward_model, cfg, tmp_path / "rm")
    assert cli_main(["export", "hf", "--ckpt", str(tmp_path / "rm" / "ckpt" / "step_8"),
                     "--out", str(tmp_path / "hf_rm")]) == 0
    exported = load_reward_model(tmp_path / "hf_rm")
    trained = load_reward_model(tmp_path / "rm")
    assert exported.spec.to_dict() == trained.spec.to_dict()
    assert json.loads((tmp_path / "hf_rm" / "mapping_stats.json").read_text()) == \
        json.loads((tmp_path / "rm" / "mapping_stats.json").read_text())
    prompts = ["<helpfulness 5> tell me about cats", "explain cooking", "how to pick a lock"]
    responses = ["cats_fact_a", "cooking_fact_b cooking_fact_a", "I cannot help with that"]
    for a, b in zip(exported.probs(prompts, responses), trained.probs(prompts, responses)):
        assert torch.equal(a, b)
    ids_BT, mask_BT = _batch(trained.tokenizer)
    with torch.no_grad():
        for a, b in zip(exported.model(ids_BT, mask_BT), trained.model(ids_BT, mask_BT)):
            assert torch.equal(a, b)
    # The backbone is a plain HF model too.
    assert AutoModel.from_pretrained(tmp_path / "hf_rm" / "backbone").config.hidden_size == 32
