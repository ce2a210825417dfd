"""Supervised warm start on the embedded world's sft.jsonl (CPU, tiny model)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from moslim_mega.config import ModelConfig, WorldConfig, load_config
from moslim_mega.data.template import render_prompt
from moslim_mega.models.build import ModelLoadError, build_causal_lm, build_tokenizer, load_policy
from moslim_mega.prefs import PreferenceSpec
from moslim_mega.reward.data import RecordError
from moslim_mega.reward.trainer import TrainingError
from moslim_mega.sft import IGNORE, encode_sft_example, load_sft_examples, sft_loss, train_sft
from moslim_mega.world.build import build_world

SMALL = [
    "sft.model.hidden_size=32",
    "sft.model.intermediate_size=64",
    "sft.model.num_layers=1",
    "sft.model.num_heads=2",
    "sft.epochs=1.5",
    "sft.batch_size=16",
    "sft.warmup_steps=3",
    "sft.lr=0.01",
    "run.tensorboard=false",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    cfg = WorldConfig(num_sft=300, num_rm_prompts=5, num_rm_eval_prompts=2, num_policy_prompts=10)
    return build_world(cfg, PreferenceSpec.datatype(4), tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def sft_run(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft")
    cfg = load_config(None, SMALL)
    result = train_sft(cfg, world["sft"], out, show_progress=False)
    return cfg, out, result


def test_loss_decreases_and_metrics_are_logged(sft_run):
    _cfg, out, result = sft_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["tag"] == "train"]
    assert [r["step"] for r in train] == list(range(0, result["steps"], 10))
    assert all({"loss", "lr", "grad_norm"} <= set(r) for r in train)
    assert result["steps"] == 29  # ceil(1.5 * ceil(300 / 16))
    assert result["final_loss"] < 0.7 * train[0]["loss"], (train[0]["loss"], result["final_loss"])
    assert result["train_seconds"] > 0


def test_saved_model_reloads_with_identical_logits(sft_run, world):
    cfg, out, result = sft_run
    assert result["model_dir"] == str(out / "model")
    assert (out / "model" / "model.safetensors").is_file()
    assert load_config(out / "config.yaml") == cfg
    # Re-train with the same config: same seed and data order give the same weights.
    again = train_sft(cfg, world["sft"], out.parent / "again", show_progress=False)
    assert again["final_loss"] == result["final_loss"]
    model, tok = load_policy(out / "model")
    plain = AutoModelForCausalLM.from_pretrained(out / "model")
    ids = tok(render_prompt(tok, "explain cooking please"), add_special_tokens=False, return_tensors="pt")["input_ids"]
    other, _ = load_policy(again["model_dir"])
    with torch.no_grad():
        a, b, c = (m(input_ids=ids).logits for m in (model, plain, other))
    assert torch.equal(a, b) and torch.equal(a, c)
    assert tok.chat_template and tok.pad_token_id is not None


def test_saved_model_matches_trained_module(world, tmp_path, monkeypatch):
    # Capture the in-memory module train_sft trained and compare it with the saved directory.
    import moslim_mega.sft as sft_mod

    built = {}
    real = sft_mod.build_causal_lm

    def capture(*args, **kw):
        built["model"] = real(*args, **kw)
        return built["model"]

    monkeypatch.setattr(sft_mod, "build_causal_lm", capture)
    cfg = load_config(None, SMALL + ["sft.epochs=0.2"])
    result = train_sft(cfg, world["sft"], tmp_path, show_progress=False)
    loaded, tok = load_policy(result["model_dir"])
    ids_BT = torch.tensor([[5, 6, 7, 8, 9, 4]])
    with torch.no_grad():
        assert torch.equal(built["model"].eval()(input_ids=ids_BT).logits, loaded(input_ids=ids_BT).logits)


def test_prompt_and_padding_carry_no_loss(world):
    tok = build_tokenizer(ModelConfig())
    data = load_sft_examples(world["sft"], tok, max_length=64)
    idx = [0, 1, 2, 3]
    ids_BT, mask_BT, labels_BT = data.batch(idx, tok.pad_token_id)
    sep = tok.convert_tokens_to_ids("<sep>")
    for b, i in enumerate(idx):
        n, P = len(data.input_ids[i]), data.prompt_lens[i]
        assert data.input_ids[i][P - 1] == sep  # the world template's prompt ends at <sep>
        assert (labels_BT[b, :P] == IGNORE).all() and (labels_BT[b, n:] == IGNORE).all()
        assert torch.equal(labels_BT[b, P:n], ids_BT[b, P:n])  # every response token, EOS included
        assert labels_BT[b, n - 1] == tok.eos_token_id
    # The loss depends only on response tokens: changing a prompt token's label target does nothing,
    # because the prompt positions are ignored.
    model = build_causal_lm(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), tok)
    with torch.no_grad():
        loss = sft_loss(model, ids_BT, mask_BT, labels_BT)
        logits_BTV = model(input_ids=ids_BT, attention_mask=mask_BT).logits
        logp_BTV = torch.log_softmax(logits_BTV[:, :-1], -1)
        lab_BT = labels_BT[:, 1:]
        keep_BT = lab_BT != IGNORE
        want = -logp_BTV.gather(-1, lab_BT.clamp(min=0)[..., None]).squeeze(-1)[keep_BT].mean()
    assert torch.allclose(loss, want, atol=1e-6)


def test_truncation_keeps_the_response_and_one_prompt_token():
    tok = build_tokenizer(ModelConfig())
    full, P = encode_sft_example(tok, "tell me about cooking please", "cooking is fun", max_length=0)
    cut, Pc = encode_sft_example(tok, "tell me about cooking please", "cooking is fun", max_length=len(full) - P + 1)
    assert Pc == 1 and cut == full[P - 1 :]


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"prompt": "hi"}', "missing field 'response'"),
        ('{"prompt": "hi", "response": "   "}', "field 'response' is empty"),
        ('{"prompt": 3, "response": "ok"}', "field 'prompt' must be a string"),
        ("[1, 2]", "must be a JSON object"),
        ("{not json", "invalid JSON"),
    ],
)
def test_bad_records_raise_record_error_naming_the_line(tmp_path, line, match):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "hi", "response": "hello"}\n\n' + line + "\n")
    with pytest.raises(RecordError, match=rf"sft.jsonl:3: .*{match}"):
        load_sft_examples(path, build_tokenizer(ModelConfig()), 64)


def test_non_finite_loss_raises_training_error_naming_the_step(world, tmp_path):
    cfg = load_config(None, SMALL + ["sft.lr=1e30", "sft.warmup_steps=0", "sft.grad_clip=0"])
    with pytest.raises(TrainingError, match=r"step \d+: sft"):
        train_sft(cfg, world["sft"], tmp_path, show_progress=False)


def test_load_policy_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_policy(tmp_path / "nope")
