"""train_policy end to end on a tiny world (CPU): saved artefacts and metrics for each algorithm, the
non-finite guard (fault injection into our own workers), and the user-error messages."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from moslim_mega.algos.core import NonFiniteError
from moslim_mega.config import load_config
from moslim_mega.engine import torch_engine
from moslim_mega.models.value import ValueModel
from moslim_mega.policy import workers
from moslim_mega.policy.controller import load_policy_prompts, train_policy
from moslim_mega.prefs import PreferenceSpec
from moslim_mega.reward.data import RecordError
from moslim_mega.models.build import load_policy

from tiny_stage import build_tiny_stage

TINY = ["hidden_size=32", "intermediate_size=64", "num_layers=1", "num_heads=2"]
SMALL = [f"sft.model.{x}" for x in TINY] + [f"rm.model.{x}" for x in TINY] + [
    "run.tensorboard=false",
    "sft.epochs=1",
    "sft.batch_size=16",
    "sft.warmup_steps=1",
    "sft.lr=0.01",
    "rm.epochs=1",
    "rm.batch_size=16",
    "rm.eval_every=0",
    "rm.warmup_steps=1",
    "policy.steps=3",
    "policy.prompts_per_step=4",
    "policy.samples_per_prompt=2",
    "policy.mini_batch_size=8",
    "policy.micro_batch_size=4",
    "policy.eval_every=0",
    "sampling.max_new_tokens=6",
]
NUM_ROWS = 4 * 2
ALGO_KEYS = {"rloo": {"pg_loss", "clipfrac"}, "ppo": {"pg_loss", "value_loss"}, "online_dpo": {"dpo_loss", "dpo_pairs"}}


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """World → a 4-step SFT → a 4-step RM, built once: (overrides, paths)."""
    built = build_tiny_stage(tmp_path_factory.mktemp("policy_stage"), SMALL)
    return {"overrides": built["overrides"], "init": built["sft_dir"], "rm": built["rm_dir"],
            "prompts": built["paths"]["policy_train"]}


def _train(stage, out, *extra, **kw):
    cfg = load_config(None, stage["overrides"] + list(extra))
    return cfg, train_policy(cfg, out, stage["init"], stage["rm"], stage["prompts"], show_progress=False, **kw)


def _rows(out, tag="train"):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["tag"] == tag]


@pytest.mark.parametrize("algo", ["rloo", "ppo", "online_dpo"])
def test_three_steps_write_policy_metrics_and_summary(stage, tmp_path, algo):
    calls = []

    def eval_fn(step, sample_fn):
        responses = sample_fn(["<helpfulness 5> tell me about cats", "explain cooking"])
        calls.append((step, responses))
        return {"num_responses": len(responses)}

    cfg, summary = _train(stage, tmp_path, f"policy.algo={algo}", "policy.eval_every=2", eval_fn=eval_fn)

    assert summary["steps"] == 3 and summary["algo"] == algo
    saved = json.loads((tmp_path / "train_summary.json").read_text())
    assert saved["steps"] == 3 and saved["policy_dir"] == str(tmp_path / "policy")
    assert load_config(tmp_path / "config.yaml") == cfg

    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert {"reward", "kl", "response_length", "kl_coef", "policy_grad_norm"} | ALGO_KEYS[algo] <= set(r), sorted(r)
        # MetricsWriter writes NaN as null: every logged number must be a finite float.
        assert all(isinstance(v, (int, float)) and math.isfinite(v) for k, v in r.items() if k != "tag"), r
        assert 1 <= r["response_length"] <= 6  # max_new_tokens=6
    assert rows[0]["kl"] == 0.0  # the reference is the initial policy
    if algo == "online_dpo":
        assert all(1 <= r["dpo_pairs"] <= 4 for r in rows)

    # eval_every=2 → the hook runs at step 2 only (never at step 0) with a greedy sampler.
    assert [s for s, _ in calls] == [2]
    assert all(isinstance(x, str) for x in calls[0][1]) and len(calls[0][1]) == 2
    assert [(r["step"], r["num_responses"]) for r in _rows(tmp_path, "eval")] == [(2, 2.0)]

    policy_dir = tmp_path / "policy"
    assert (policy_dir / "config.json").is_file() and list(policy_dir.glob("*.safetensors"))
    trained = AutoModelForCausalLM.from_pretrained(policy_dir).state_dict()
    init = AutoModelForCausalLM.from_pretrained(stage["init"]).state_dict()
    assert trained.keys() == init.keys()
    assert all(bool(torch.isfinite(v).all()) for v in trained.values())
    changed = [k for k in init if not torch.equal(init[k], trained[k])]
    assert "lm_head.weight" in changed and len(changed) >= len(init) // 2, changed
    _model, tok = load_policy(policy_dir)  # the tokenizer is saved beside the weights
    assert tok.pad_token_id is not None and tok.chat_template


# ---- the non-finite guard --------------------------------------------------------------------
def test_nan_reward_stops_at_that_step_naming_the_mapped_reward(stage, tmp_path, monkeypatch):
    real_score = workers.RewardWorker.score
    calls = []

    def score_with_nan_at_step_2(self, prompts, responses):
        out = real_score(self, prompts, responses)
        calls.append(len(prompts))
        if len(calls) == 3:  # one score() per step: the third call is step 2
            out.reward_B[0] = float("nan")
        return out

    monkeypatch.setattr(workers.RewardWorker, "score", score_with_nan_at_step_2)
    with pytest.raises(NonFiniteError, match=r"^step 2: mapped reward is not finite$"):
        _train(stage, tmp_path, "policy.algo=rloo")
    assert calls == [NUM_ROWS] * 3
    assert [r["step"] for r in _rows(tmp_path)] == [0, 1]  # steps before the fault were logged
    assert not (tmp_path / "policy").exists()  # a poisoned run saves no policy


class StepFaults:
    """Fault injection into our own workers and training engines: counts the frozen reference's
    log-prob pass (one per step, right after the rollout) to know the step, and fills one quantity
    with NaN at ``at_step``."""

    def __init__(self, monkeypatch, what: str, at_step: int = 1):
        self.what, self.at_step, self.ref_rows = what, at_step, []
        real_logprobs, real_values = workers.LogprobWorker.logprobs, ValueModel.forward
        real_engine_logprobs = torch_engine.sequence_logprobs
        faults = self

        def logprobs(worker, ids_BT, mask_BT, grad=False):
            logp_BT, ent_BT = real_logprobs(worker, ids_BT, mask_BT, grad)
            is_reference = not any(p.requires_grad for p in worker.model.parameters())
            if is_reference:
                faults.ref_rows.append(ids_BT.shape[0])
            if faults.now and is_reference and what == "reference":
                logp_BT = logp_BT + float("nan")
            return logp_BT, ent_BT

        def engine_logprobs(model, ids_BT, mask_BT, **kwargs):  # the actor engine's forward
            logp_BT, ent_BT = real_engine_logprobs(model, ids_BT, mask_BT, **kwargs)
            if faults.now and what == "policy_update" and torch.is_grad_enabled():
                logp_BT = logp_BT + float("nan")  # keeps the autograd graph of the update pass
            return logp_BT, ent_BT

        def values(critic, ids_BT, attn_BT):
            v_BT = real_values(critic, ids_BT, attn_BT)
            if faults.now and what == "critic_update" and torch.is_grad_enabled():
                v_BT = v_BT * float("nan")
            return v_BT

        monkeypatch.setattr(workers.LogprobWorker, "logprobs", logprobs)
        monkeypatch.setattr(torch_engine, "sequence_logprobs", engine_logprobs)
        monkeypatch.setattr(ValueModel, "forward", values)

    @property
    def now(self) -> bool:
        return len(self.ref_rows) - 1 == self.at_step


@pytest.mark.parametrize(
    "algo, what, quantity",
    [
        # NaN reference log-probs → NaN KL → the KL-shaped rewards (kl_in_reward) → advantages.
        ("rloo", "reference", "advantages"),
        ("ppo", "reference", "advantages"),
        # Online-DPO has no advantages: the reference enters the loss through its log-ratios.
        ("online_dpo", "reference", "dpo_loss"),
        # NaN in the update's own forward passes → the losses.
        ("rloo", "policy_update", "pg_loss"),
        ("online_dpo", "policy_update", "dpo_loss"),
        ("ppo", "critic_update", "value_loss"),
    ],
)
def test_nan_at_step_1_stops_the_run_naming_step_and_quantity(stage, tmp_path, monkeypatch, algo, what, quantity):
    faults = StepFaults(monkeypatch, what, at_step=1)
    with pytest.raises(NonFiniteError, match=rf"^step 1: {quantity} is not finite$"):
        _train(stage, tmp_path, f"policy.algo={algo}", "policy.kl_in_reward=true")
    assert faults.ref_rows == [NUM_ROWS] * 2  # stopped in step 1, not later
    assert [r["step"] for r in _rows(tmp_path)] == [0]


def test_diverging_learning_rate_stops_with_a_named_step(stage, tmp_path):
    # lr=1e6 is not enough on this model: AdamW steps are ≈ lr·sign(g), the softmax saturates and
    # every quantity stays finite (the run completes), so the divergence needs a step that overflows.
    with pytest.raises(NonFiniteError, match=r"^step \d+: .* is not finite$"):
        _train(stage, tmp_path, "policy.algo=rloo", "policy.lr=1e30", "policy.grad_clip=0", "policy.warmup_steps=0")


# ---- user errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["rloo", "online_dpo"])
def test_one_sample_per_prompt_is_a_value_error_naming_the_field(stage, tmp_path, algo):
    with pytest.raises(ValueError, match=r"policy\.samples_per_prompt=1: .*at least 2 samples per prompt"):
        _train(stage, tmp_path, f"policy.algo={algo}", "policy.samples_per_prompt=1")


def test_bad_prefix_in_the_prompt_file_is_a_record_error_naming_the_line(stage, tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = ['{"prompt": "<helpfulness 5> tell me about cats"}', "", '{"prompt": "<helpfulness 9> explain cooking"}']
    path.write_text("\n".join(lines) + "\n")
    cfg = load_config(None, stage["overrides"])
    with pytest.raises(RecordError, match=r"prompts\.jsonl:3: field 'prompt': .*helpfulness"):
        train_policy(cfg, tmp_path / "run", stage["init"], stage["rm"], path, show_progress=False)
    assert not (tmp_path / "run" / "policy").exists()


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"prompt": "<colour 3> tell me about cats"}', r"prompts\.jsonl:2: field 'prompt': .*colour"),
        ('{"prompt": "<honesty 2 explain cooking"}', r"prompts\.jsonl:2: field 'prompt': unterminated tag"),
        ('{"text": "explain cooking"}', r"prompts\.jsonl:2: missing string field 'prompt'"),
        ('"explain cooking"', r"prompts\.jsonl:2: missing string field 'prompt'"),
    ],
)
def test_load_policy_prompts_errors_name_the_line(tmp_path, line, match):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "<honesty max> explain cooking"}\n' + line + "\n")
    with pytest.raises(RecordError, match=match):
        load_policy_prompts(path, PreferenceSpec.datatype(4))


def test_load_policy_prompts_keeps_prefixes_and_rejects_an_empty_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "<honesty max> explain cooking"}\n{"prompt": "tell me about cats"}\n')
    prompts = load_policy_prompts(path, PreferenceSpec.datatype(4))
    assert prompts == ["<honesty max> explain cooking", "tell me about cats"]
    path.write_text("\n")
    with pytest.raises(RecordError, match="no prompts"):
        load_policy_prompts(path, PreferenceSpec.datatype(4))


def test_policy_train_cli_with_checkpoints(stage, tmp_path, capsys):
    from moslim_mega.cli import main

    args = ["policy", "train", "--out", str(tmp_path), *stage["overrides"], "policy.steps=4", "policy.save_every=2",
            f"policy.init={stage['init']}", f"policy.rm_dir={stage['rm']}", f"policy.prompts={stage['prompts']}"]
    assert main(args) == 0
    assert "policy saved to" in capsys.readouterr().out
    ckpt = tmp_path / "checkpoints" / "step_2"
    assert (ckpt / "config.json").exists() and (ckpt / "tokenizer.json").exists()
    step2 = AutoModelForCausalLM.from_pretrained(ckpt)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert any(not torch.equal(a, b) for a, b in zip(step2.parameters(), final.parameters()))
    # without the three inputs the command explains what it needs
    assert main(["policy", "train", "--out", str(tmp_path / "x")]) == 2
    assert "policy.init" in capsys.readouterr().err


# ---- prompts that open with markup (issue 13, item 1) ------------------------------------------
MARKUP = ['<div class="q">tell me about cats</div>', "<code>print(1)</code> explain cooking",
          "<|im_start|>user tell me about dogs", "</s>explain rain"]


def test_policy_loop_takes_markup_prompts_and_the_rm_sees_them_verbatim(stage, tmp_path, monkeypatch):
    lines = [{"prompt": "<helpfulness 5><harmless 1>" + MARKUP[0]}, {"prompt": "<honesty min>" + MARKUP[1]},
             {"prompt": MARKUP[2]}, {"prompt": MARKUP[3]}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    spec = PreferenceSpec.datatype(4)
    assert load_policy_prompts(path, spec) == [x["prompt"] for x in lines]
    seen = []
    real_score = workers.RewardWorker.score

    def recording_score(self, prompts, responses):
        out = real_score(self, prompts, responses)
        seen.append((list(prompts), out.targets_BH.clone()))
        return out

    real_rm_score = workers.LoadedRewardModel.score
    rm_inputs = []

    def recording_rm_score(self, prompts, *args, **kw):
        rm_inputs.extend(prompts)
        return real_rm_score(self, prompts, *args, **kw)

    monkeypatch.setattr(workers.RewardWorker, "score", recording_score)
    monkeypatch.setattr(workers.LoadedRewardModel, "score", recording_rm_score)
    cfg = load_config(None, stage["overrides"] + ["policy.steps=1"])
    summary = train_policy(cfg, tmp_path / "run", stage["init"], stage["rm"], path, show_progress=False)
    assert summary["steps"] == 1
    ((prompts, targets_BH),) = seen
    want = {"<helpfulness 5><harmless 1>" + MARKUP[0]: [4, -1, 1], "<honesty min>" + MARKUP[1]: [-1, 0, -1],
            MARKUP[2]: [-1, -1, -1], MARKUP[3]: [-1, -1, -1]}
    assert [want[p] for p in prompts] == targets_BH.tolist()
    assert set(rm_inputs) <= set(MARKUP) and len(rm_inputs) == len(prompts)  # prefix stripped, markup kept


# ---- the RM scores what it was trained on -----------------------------------------------------
def test_rewards_during_training_come_from_the_rm_training_time_token_ids(stage, tmp_path, monkeypatch):
    """An RM trained with rm.max_length=6 (shorter than every rollout): each (prompt, response)
    it scores inside train_policy reaches the RM as exactly the ids its training data path
    (load_rm_examples at rm.max_length) gives the same pair, not a longer, never-seen input."""
    from moslim_mega.data.template import encode_pair
    from moslim_mega.models.build import build_tokenizer
    from moslim_mega.prefs import strip_prefix
    from moslim_mega.reward.data import load_rm_examples
    from moslim_mega.reward.model import MultiHeadRewardModel
    from moslim_mega.reward.trainer import train_reward_model

    rm_cfg = load_config(None, stage["overrides"] + ["rm.max_length=6"])
    train_reward_model(rm_cfg, tmp_path / "rm", show_progress=False)
    scored, fed = [], []
    real_score, real_forward = workers.RewardWorker.score, MultiHeadRewardModel.forward

    def score(self, prompts, responses):
        scored.extend(zip(prompts, responses))
        return real_score(self, prompts, responses)

    def forward(self, ids_BT, mask_BT, head=None):
        fed.extend(row[m.bool()].tolist() for row, m in zip(ids_BT, mask_BT))
        return real_forward(self, ids_BT, mask_BT, head=head)

    monkeypatch.setattr(workers.RewardWorker, "score", score)
    monkeypatch.setattr(MultiHeadRewardModel, "forward", forward)
    cfg = load_config(None, stage["overrides"] + ["policy.steps=1"])
    train_policy(cfg, tmp_path / "pol", stage["init"], tmp_path / "rm", stage["prompts"], show_progress=False)
    assert len(scored) == len(fed) == NUM_ROWS

    spec = PreferenceSpec.datatype(4)
    tok = build_tokenizer(rm_cfg.rm.model, spec.names)  # the tokenizer the RM trainer built
    assert all(len(encode_pair(tok, strip_prefix(p, spec), r, 0)) > 6 for p, r in scored)  # all get cut
    kept = [i for i, (_, r) in enumerate(scored) if r.strip()]  # the RM data refuses empty responses
    assert kept
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps({"prompt": scored[i][0], "response": scored[i][1],
                                        "ratings": dict.fromkeys(spec.names)}) + "\n" for i in kept))
    trained = load_rm_examples(data, spec, tok, rm_cfg.rm.max_length)
    assert [fed[i] for i in kept] == trained.input_ids
    assert all(len(ids) == 6 for ids in fed)
