"""Chat templates: multi-turn transcripts, and a policy and an RM with different templates."""

import pytest
import torch

from moslim_mega.config import ModelConfig
from moslim_mega.data.template import (
    TemplateError,
    apply_template_choice,
    encode_pair,
    render_pair,
    render_prompt,
    to_messages,
)
from moslim_mega.models.build import build_backbone, build_tokenizer
from moslim_mega.prefs import PreferenceSpec
from moslim_mega.reward.io import load_reward_model, save_reward_model
from moslim_mega.reward.mapping import RunningClassStats
from moslim_mega.reward.model import MultiHeadRewardModel
from moslim_mega.rollout import encode_prompts
from moslim_mega.sft import encode_sft_example

SPEC = PreferenceSpec.datatype(4)
TRANSCRIPT = "\n\nHuman: cooking\n\nAssistant: cooking_fact_a\n\nHuman: tell me about cooking\n\nAssistant:"
PREFIXED = "<helpfulness 5><harmlessness 1>" + TRANSCRIPT
# A second template, deliberately unlike the world's own: role words and a closing marker.
RM_TEMPLATE = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <sep> {% endfor %}<eos>"
TINY = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)


def test_transcript_becomes_one_message_per_turn_with_the_prefix_in_the_first():
    assert to_messages(PREFIXED) == [
        {"role": "user", "content": "<helpfulness 5><harmlessness 1>cooking"},
        {"role": "assistant", "content": "cooking_fact_a"},
        {"role": "user", "content": "tell me about cooking"},
    ]
    assert to_messages(TRANSCRIPT.lstrip())[0] == {"role": "user", "content": "cooking"}  # strip_prefix output
    # not transcripts: plain text, a quoted dialogue that does not end on an open assistant turn
    for text in ("tell me about cooking", "Summarise:\n\nHuman: hi\n\nAssistant: hello"):
        assert to_messages(text) == [{"role": "user", "content": text}]


@pytest.fixture()
def rm_tokenizer(tmp_path):
    path = tmp_path / "rm_template.jinja"
    path.write_text(RM_TEMPLATE)
    return build_tokenizer(ModelConfig(chat_template=str(path)), SPEC.names)


def test_policy_and_rm_render_with_their_own_templates(rm_tokenizer):
    policy_tok = build_tokenizer(ModelConfig(), SPEC.names)
    assert render_prompt(policy_tok, PREFIXED) == (
        "<helpfulness 5><harmlessness 1>cooking <sep> cooking_fact_a <eos>tell me about cooking <sep>"
    )
    stripped = TRANSCRIPT.lstrip()  # what strip_prefix hands the RM
    assert render_pair(rm_tokenizer, stripped, "cooking_fact_b") == (
        "user cooking <sep> assistant cooking_fact_a <sep> user tell me about cooking <sep> "
        "assistant cooking_fact_b <sep> <eos>"
    )
    # the SFT/policy invariant (prompt tokens are a prefix of prompt+response) holds for turns too
    seq, n_prompt = encode_sft_example(policy_tok, PREFIXED, "cooking_fact_b", 0)
    assert policy_tok.decode(seq[n_prompt:]).split() == ["cooking_fact_b", "<eos>"]


def test_rm_rescores_the_stripped_prompt_with_its_own_template(rm_tokenizer, tmp_path):
    """A saved RM keeps its template; scoring a prefixed policy prompt equals a forward pass on
    the RM template's rendering of the prefix-free conversation (written out by hand)."""
    backbone = build_backbone(ModelConfig(**TINY), rm_tokenizer, seed=0)
    model = MultiHeadRewardModel(backbone, SPEC.num_classes)
    save_reward_model(model, rm_tokenizer, SPEC, RunningClassStats(SPEC.num_classes), tmp_path / "rm", max_length=96)
    rm = load_reward_model(tmp_path / "rm")
    got = rm.probs([PREFIXED], ["cooking_fact_b"])
    text = ("user cooking <sep> assistant cooking_fact_a <sep> user tell me about cooking <sep> "
            "assistant cooking_fact_b <sep> <eos>")
    ids = rm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == encode_pair(rm.tokenizer, TRANSCRIPT.lstrip(), "cooking_fact_b", 0)
    with torch.no_grad():
        want = [torch.softmax(x, -1) for x in rm.model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))]
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-6)
    # while the policy's generator encodes the prefix, in its own (world) template
    policy_tok = build_tokenizer(ModelConfig(), SPEC.names)
    (prompt_ids,) = encode_prompts(policy_tok, [PREFIXED])  # what every rollout engine receives
    tag_ids = policy_tok.convert_tokens_to_ids(["<helpfulness 5>", "<harmlessness 1>"])
    assert prompt_ids[:2] == tag_ids and not set(tag_ids) & set(ids)


def test_plain_text_fallback_and_bad_template_choice(tmp_path):
    tok = build_tokenizer(ModelConfig(chat_template="none"), SPEC.names)
    assert tok.chat_template is None
    assert render_prompt(tok, TRANSCRIPT) == TRANSCRIPT
    assert render_pair(tok, TRANSCRIPT, "cooking_fact_b") == TRANSCRIPT + " cooking_fact_b<eos>"
    assert render_pair(tok, "tell me", "x") == "tell me\nx<eos>"
    with pytest.raises(TemplateError, match="model.chat_template='nope.jinja'"):
        apply_template_choice(tok, "nope.jinja")
