import json

import pytest

from moslim_mega.config import ModelConfig
from moslim_mega.models.build import build_tokenizer
from moslim_mega.prefs import PreferenceSpec
from moslim_mega.reward.data import RecordError, load_rm_examples, parse_record

SPEC = PreferenceSpec.datatype(4)
GOOD = {"prompt": "tell me about cooking", "response": "cooking_fact_a", "ratings": {"helpfulness": 2, "honesty": 5, "harmlessness": 1}}


def _with(**changes):
    rec = json.loads(json.dumps(GOOD))
    for k, v in changes.items():
        if v is ...:
            rec.pop(k)
        else:
            rec[k] = v
    return rec


def test_good_record_bins_ratings_and_strips_a_prefix():
    rec = _with(prompt="<helpfulness 5><harmless 0>tell me about cooking")
    prompt, response, group, labels = parse_record(rec, SPEC, "f:1")
    assert prompt == "tell me about cooking" and response == "cooking_fact_a"
    assert labels == [1, 4, 1] and group == prompt


def test_null_rating_masks_the_head_and_aliases_are_accepted():
    rec = _with(ratings={"helpfulness": None, "honest": 3, "harmless": 0}, prompt_id="p7")
    _, _, group, labels = parse_record(rec, SPEC, "f:1")
    assert labels == [-1, 2, 0] and group == "p7"


@pytest.mark.parametrize(
    "rec, match",
    [
        (_with(prompt=...), "missing field 'prompt'"),
        (_with(response=3), "field 'response' must be a string"),
        (_with(response="   "), "field 'response' is empty"),
        (_with(ratings=...), "field 'ratings'"),
        (_with(ratings={"helpfulness": 2, "honesty": 5, "harmlessness": 1, "fun": 3}), "ratings.fun: unknown dimension"),
        (_with(ratings={"helpfulness": 2, "honesty": 5}), "no 'harmlessness'"),
        (_with(ratings={"helpfulness": "abc", "honesty": 5, "harmlessness": 1}), "ratings.helpfulness: .*not numeric"),
        (_with(ratings={"helpfulness": 7, "honesty": 5, "harmlessness": 1}), "ratings.helpfulness: .*outside"),
        (_with(prompt="<helpfulness 9>hi"), "field 'prompt': in tag '<helpfulness 9>'"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_records_raise_naming_the_field(rec, match):
    with pytest.raises(RecordError, match=match):
        parse_record(rec, SPEC, "data.jsonl:12")
    with pytest.raises(RecordError, match="data.jsonl:12"):
        parse_record(rec, SPEC, "data.jsonl:12")


def test_bad_json_line_and_missing_file(tmp_path):
    tok = build_tokenizer(ModelConfig())
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(RecordError, match=r"d.jsonl:2: invalid JSON"):
        load_rm_examples(p, SPEC, tok, 64)
    with pytest.raises(RecordError, match="not found"):
        load_rm_examples(tmp_path / "nope.jsonl", SPEC, tok, 64)


def test_examples_keep_every_valid_record_and_truncate_from_the_left(tmp_path):
    tok = build_tokenizer(ModelConfig())
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(_with(prompt_id=f"p{i}")) for i in range(5)) + "\n\n")
    ex = load_rm_examples(p, SPEC, tok, max_length=4)
    assert len(ex) == 5 and ex.labels_NH.shape == (5, 3)
    assert all(len(s) == 4 for s in ex.input_ids)
    assert ex.input_ids[0][-1] == tok.eos_token_id  # the read-out token survives truncation


@pytest.mark.parametrize(
    "markup",
    ['<div class="q">What is 2+2?</div>', "<code>x = 1</code> explain", '<html lang="en">hi', "<|im_start|>user hi",
     "<!-- c --> hi", "</s> hi", "<b>bold</b>"],
)
def test_markup_prompts_are_prompt_text(markup):
    assert parse_record(_with(prompt=markup), SPEC, "f:1")[0] == markup
    prompt, _, _, labels = parse_record(_with(prompt="<helpfulness 5>" + markup), SPEC, "f:1")
    assert prompt == markup and labels == [1, 4, 1]


@pytest.mark.parametrize("prompt, named", [("<helpfulness 9><div>hi", "<helpfulness 9>"), ("<foo 3><div>hi", "foo"),
                                           ("<helpfulness><div>hi", "<helpfulness>")])
def test_bad_tag_before_markup_is_a_record_error(prompt, named):
    with pytest.raises(RecordError, match=f"f:7: field 'prompt': .*{named}"):
        parse_record(_with(prompt=prompt), SPEC, "f:7")
