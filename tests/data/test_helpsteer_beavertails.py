"""HelpSteer/HelpSteer2 regression targets and BeaverTails majority-voted safety labels."""

import gzip
import json

import pytest

from moslim_mega.data.beavertails import load_beavertails
from moslim_mega.data.helpsteer import ATTRIBUTES, load_helpsteer, unpack_turns
from moslim_mega.data.template import to_messages


def _hs(prompt, response, *scores):
    return dict(prompt=prompt, response=response, **dict(zip(ATTRIBUTES, scores)))


def test_helpsteer_targets_multi_turn_and_drops(tmp_path):
    rows = [
        _hs("What is c#?", "A language.", 3, 4, 4, 1, 0),
        _hs("c#<extra_id_1>Assistant\nA language.<extra_id_1>User\nwho made it?", "Microsoft.", 4, 4, 4, 2, 1),
        _hs("q", "", 1, 1, 1, 1, 1),  # empty response
        _hs("q", "r", 1, 5, 1, 1, 1),  # correctness out of 0-4
        {"prompt": "q", "response": "r", "helpfulness": 2},  # attributes missing
        _hs("a<extra_id_1>Robot\nb", "r", 1, 1, 1, 1, 1),  # unknown role line
    ]
    path = tmp_path / "train.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows))
    records, log = load_helpsteer(str(path))
    assert [r["targets"] for r in records] == [
        dict(zip(ATTRIBUTES, [3.0, 4.0, 4.0, 1.0, 0.0])), dict(zip(ATTRIBUTES, [4.0, 4.0, 4.0, 2.0, 1.0]))
    ]
    assert records[1]["prompt"] == "\n\nHuman: c#\n\nAssistant: A language.\n\nHuman: who made it?\n\nAssistant:"
    assert [m["role"] for m in to_messages(records[1]["prompt"])] == ["user", "assistant", "user"]
    assert [(d["where"].rsplit(":", 1)[1], d["reason"].split(":")[0]) for d in log.drops] == [
        ("3", "empty text"), ("4", "rating out of range"), ("5", "missing field"), ("6", "malformed multi-turn prompt")
    ]
    scaled, _ = load_helpsteer(str(path), scale=True)
    assert scaled[0]["targets"]["correctness"] == 1.0 and scaled[0]["targets"]["complexity"] == 0.25


def test_unpack_turns_leaves_single_turn_prompts_alone():
    assert unpack_turns("just one question") == "just one question"


def test_beavertails_majority_vote_dedup_and_ties(tmp_path):
    cat = {"violence": True, "privacy_violation": False}
    rows = [
        {"prompt": "p1", "response": "r1", "is_safe": False, "category": cat},
        {"prompt": "p1", "response": "r1", "is_safe": False, "category": cat},
        {"prompt": "p1", "response": "r1", "is_safe": True, "category": {"violence": False}},
        {"prompt": "p2", "response": "r2", "is_safe": True, "category": {}},
        {"prompt": "p3", "response": "r3", "is_safe": True, "category": {}},
        {"prompt": "p3", "response": "r3", "is_safe": False, "category": cat},  # tie → no label
        {"prompt": "p4", "response": "r4", "is_safe": "yes", "category": {}},  # not a bool
    ]
    path = tmp_path / "330k_train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    records, log = load_beavertails(str(path))
    assert [(r["prompt"], r["is_safe"], r["votes"]) for r in records] == [
        ("p1", False, {"safe": 1, "unsafe": 2}), ("p2", True, {"safe": 1, "unsafe": 0})
    ]
    assert records[0]["category_votes"] == {"violence": 2}
    assert log.counts["beavertails.duplicate_annotations"] == 3
    assert log.counts["beavertails.disagreements"] == 2
    assert sorted(d["reason"].split(":")[0] for d in log.drops) == ["tied vote", "wrong type"]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_helpsteer(str(tmp_path / "none.jsonl"))
