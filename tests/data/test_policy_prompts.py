"""hh-rlhf → policy prompts: last-Assistant cut, multi-turn, dedup, exclusion, seeded prefixes."""

import json
from collections import Counter

import pytest
from datafixtures import hh_transcript, write_hh_rlhf

from moslim_mega.data.prompts import build_policy_prompts, hh_prompt
from moslim_mega.policy.controller import load_policy_prompts
from moslim_mega.prefs import PreferenceSpec, parse_prefix

SPEC = PreferenceSpec.datatype(4)


@pytest.fixture(scope="module")
def hh(tmp_path_factory):
    path = tmp_path_factory.mktemp("hh") / "train.jsonl"
    return path, write_hh_rlhf(path)


def _rows(out):
    return [json.loads(x) for x in (out / "policy_train.jsonl").read_text().splitlines()]


def test_prompt_is_the_transcript_up_to_the_last_assistant_turn():
    t = hh_transcript(["a", "b", "c", "d"])
    assert hh_prompt(t) == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    assert hh_prompt("\n\nHuman: only a question") is None


def test_all_prompts_deduplicated_multi_turn_kept_and_drops_reported(hh, tmp_path):
    path, exp = hh
    stats = build_policy_prompts(str(path), tmp_path, 0, SPEC, seed=0)
    rows = _rows(tmp_path)
    stripped = [parse_prefix(r["prompt"], SPEC)[1] for r in rows]
    # parse_prefix drops the whitespace after the prefix; the transcript itself is unchanged
    assert sorted(stripped) == sorted(p.lstrip() for p in exp["prompts"])
    assert stats["written"] == stats["pool"] == len(exp["prompts"])
    assert stats["counts"]["hh-rlhf.duplicates"] == 1
    got = {(d["where"].rsplit(":", 1)[1], d["reason"].split(":")[0]) for d in stats["dropped"]}
    assert got == {(str(line), kind) for line, kind in exp["drops"]}
    multi = [p for p in stripped if p.count("Human:") > 1]
    assert stats["multi_turn"] == len(multi) > 0
    assert "Human: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: How do I cook rice?\n\nAssistant:" in stripped


def test_prefixes_are_seeded_in_range_and_match_the_recorded_distribution(hh, tmp_path):
    path, _ = hh
    stats = build_policy_prompts(str(path), tmp_path / "a", 20, SPEC, seed=7)
    rows = _rows(tmp_path / "a")
    assert len(rows) == 20
    for r in rows:
        targets, _ = parse_prefix(r["prompt"], SPEC)
        assert 1 <= len(targets) <= 3
        assert {k: SPEC[k].first_level + c for k, c in targets.items()} == r["targets"]
    dist = stats["prefix_distribution"]
    assert dist["num_dimensions"] == {str(k): sum(len(r["targets"]) == k for r in rows) for k in (1, 2, 3)}
    levels = Counter((n, lv) for r in rows for n, lv in r["targets"].items())
    for name, hist in dist["levels"].items():
        assert set(hist) == {str(lv) for lv in SPEC[name].levels}  # helpfulness 1-5, harmlessness 0-1
        for lv, n in hist.items():
            assert n == levels[(name, int(lv))]
    again = build_policy_prompts(str(path), tmp_path / "b", 20, SPEC, seed=7)
    assert _rows(tmp_path / "b") == rows and again["prefix_distribution"] == dist
    build_policy_prompts(str(path), tmp_path / "c", 20, SPEC, seed=8)
    assert _rows(tmp_path / "c") != rows


def test_exclusion_removes_sft_prompts(hh, tmp_path):
    path, exp = hh
    sft = tmp_path / "sft.jsonl"
    excluded = exp["prompts"][:3]
    sft.write_text("".join(json.dumps({"prompt": p.strip(), "response": "x"}) + "\n" for p in excluded))
    stats = build_policy_prompts(str(path), tmp_path / "out", 0, SPEC, seed=0, exclude=str(sft))
    stripped = {parse_prefix(r["prompt"], SPEC)[1] for r in _rows(tmp_path / "out")}
    assert stats["counts"]["hh-rlhf.excluded"] == 3
    assert not stripped & {p.lstrip() for p in excluded}
    assert len(stripped) == len(exp["prompts"]) - 3


def test_asking_for_more_than_the_pool_warns_and_the_trainer_reads_the_output(hh, tmp_path):
    path, exp = hh
    stats = build_policy_prompts(str(path), tmp_path, 10_000, SPEC, seed=0)
    assert stats["written"] == len(exp["prompts"]) and "only" in stats["warning"]
    assert len(load_policy_prompts(tmp_path / "policy_train.jsonl", SPEC)) == len(exp["prompts"])


def test_markup_transcripts_keep_their_markup_after_the_prefix(tmp_path):
    """`data build-prompts`: a transcript that opens with markup gets a prefix and parses back to
    it intact; one that opens with a preference tag is dropped, the tag named."""
    from moslim_mega.cli import main

    markup = ['<system>Be brief.</system>\n\nHuman: Hi\n\nAssistant:', "<|im_start|>system\n\nHuman: Hello\n\nAssistant:",
              '<div class="chat">\n\nHuman: <code>x=1</code> ok?\n\nAssistant:']
    tagged = ["<helpfulness 2>\n\nHuman: Hey\n\nAssistant:", "<foo 1>\n\nHuman: Yo\n\nAssistant:"]
    src = tmp_path / "hh.jsonl"
    src.write_text("".join(json.dumps({"chosen": p + " yes", "rejected": p + " no"}) + "\n" for p in markup + tagged))
    assert main(["data", "build-prompts", "--hh-rlhf", str(src), "--n", "0", "--out", str(tmp_path / "out")]) == 0
    rows = _rows(tmp_path / "out")
    assert sorted(parse_prefix(r["prompt"], SPEC)[1] for r in rows) == sorted(markup)
    for r in rows:
        targets, _ = parse_prefix(r["prompt"], SPEC)
        assert {k: SPEC[k].first_level + c for k, c in targets.items()} == r["targets"] and targets
    assert load_policy_prompts(tmp_path / "out" / "policy_train.jsonl", SPEC) == [r["prompt"] for r in rows]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert sorted(d["where"].rsplit(":", 1)[1] for d in stats["dropped"]) == ["4", "5"]
    assert all(d["reason"].startswith("preference tag:") for d in stats["dropped"])
    assert any("'<foo 1>'" in d["reason"] for d in stats["dropped"])
