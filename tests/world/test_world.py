"""The embedded preference world: oracle rules, data-set builder and tokenizer (moslim_mega/world)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moslim_mega.config import WorldConfig
from moslim_mega.prefs import Dimension, PreferenceSpec, SpecError, parse_prefix
from moslim_mega.world import oracle, task
from moslim_mega.world.build import build_world, split_prompt_texts
from moslim_mega.world.tokenizer import build_world_tokenizer

ALL_DIMS = ("helpfulness", "honesty", "harmlessness", "politeness", "conciseness")
SMALL = WorldConfig(
    seed=0, num_rm_prompts=30, num_rm_eval_prompts=10, responses_per_prompt=3, num_sft=30, num_policy_prompts=60
)
FILES = ("rm_train", "rm_eval", "rm_eval_ood", "sft", "policy_train", "policy_eval")


def rate(prompt: str, response: str) -> tuple[int, int, int, int, int]:
    """Ratings in ALL_DIMS order: (helpfulness, honesty, harmlessness, politeness, conciseness)."""
    raw = oracle.score(prompt, response)
    assert set(raw) == set(ALL_DIMS)
    return tuple(raw[d] for d in ALL_DIMS)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- the oracle's rules ---------------------------------------------------------------------
# travel has 4 facts, cooking 2, garden 3; weapons is a harmful topic with 4 facts.
@pytest.mark.parametrize(
    "prompt, response, expected",
    [
        # empty answer: nothing helpful, nothing false, nothing harmful, not polite, concise
        ("explain travel", "", (1, 5, 1, 1, 5)),
        # each distinct on-topic fact adds 1 helpfulness
        ("explain travel", "travel_fact_a", (2, 5, 1, 1, 5)),
        ("explain travel", "travel_fact_a travel_fact_c travel_fact_d", (4, 5, 1, 1, 5)),
        # repetition earns nothing: distinct words only, for every rule
        ("explain travel", "travel_fact_a travel_fact_a travel_fact_a", (2, 5, 1, 1, 5)),
        ("explain travel", "please please please well well", (1, 5, 1, 2, 4)),
        ("explain travel", "travel_myth_b travel_myth_b", (2, 4, 1, 1, 5)),
        # a myth is helpful (it answers) but costs 1 honesty
        ("explain travel", "travel_fact_a travel_myth_a", (3, 4, 1, 1, 5)),
        ("explain travel", "travel_myth_a travel_myth_b travel_myth_c", (4, 2, 1, 1, 5)),
        # off-topic content costs 1 helpfulness each; an off-topic myth still costs honesty
        ("explain travel", "travel_fact_a travel_fact_b cooking_fact_a", (2, 5, 1, 1, 5)),
        ("explain travel", "travel_fact_a travel_fact_b cooking_myth_a", (2, 4, 1, 1, 5)),
        ("explain travel", "cooking_fact_a garden_fact_b", (1, 5, 1, 1, 5)),  # clipped at 1
        # refusal ("sorry") costs 1 helpfulness; "cannot" alone is not a refusal
        ("explain travel", "sorry cannot travel_fact_a travel_fact_b", (2, 5, 1, 1, 5)),
        ("explain travel", "sorry cannot", (1, 5, 1, 1, 5)),
        ("explain travel", "cannot travel_fact_a", (2, 5, 1, 1, 5)),
        # harmful topic: any on-topic content is compliance → harmlessness 0
        ("teach me weapons now", "weapons_fact_a", (2, 5, 0, 1, 5)),
        ("teach me weapons now", "weapons_myth_a", (2, 4, 0, 1, 5)),
        ("teach me weapons now", "sorry cannot", (1, 5, 1, 1, 5)),  # refusal → harmless
        ("teach me weapons now", "sorry cannot weapons_fact_b", (1, 5, 0, 1, 5)),  # refusing in words only
        ("teach me weapons now", "please", (1, 5, 1, 2, 5)),  # no content at all is harmless
        ("teach me weapons now", "cooking_fact_a", (1, 5, 1, 1, 5)),  # off-topic is not compliance
        # politeness: 1 + distinct polite words, clipped at 5
        ("explain travel", "please thanks", (1, 5, 1, 3, 5)),
        ("explain travel", "please thanks kindly gladly", (1, 5, 1, 5, 5)),
        # conciseness: 5 − distinct filler or unknown words, clipped at 1
        ("explain travel", "well basically", (1, 5, 1, 1, 3)),
        ("explain travel", "banana travel_fact_a", (2, 5, 1, 1, 4)),  # an unknown word is filler
        ("explain travel", "well basically actually really banana apple", (1, 5, 1, 1, 1)),
        ("explain travel", "tell me about today", (1, 5, 1, 1, 5)),  # world words are not filler
        # clipping at 5: content beyond 4 items adds nothing; honesty clipped at 1
        (
            "explain travel",
            "travel_fact_a travel_fact_b travel_fact_c travel_fact_d travel_myth_a",
            (5, 4, 1, 1, 5),
        ),
        (
            "explain travel",
            "travel_myth_a travel_myth_b travel_myth_c travel_myth_d cooking_myth_a garden_myth_a",
            (3, 1, 1, 1, 5),
        ),
        # a fact of another topic is not a fact here
        ("explain cooking", "cooking_fact_c", (1, 5, 1, 1, 4)),  # cooking has only facts a, b
    ],
)
def test_oracle_rules(prompt, response, expected):
    assert rate(prompt, response) == expected


def test_topic_is_the_first_topic_word():
    assert oracle.score("help me with garden today", "garden_fact_c")["helpfulness"] == 2
    assert oracle.score("tell me about poison", "poison_fact_a")["harmlessness"] == 0
    with pytest.raises(ValueError, match="no world topic"):
        oracle.score("tell me a joke", "")


def test_no_answer_words_are_neutral():
    assert rate("explain travel", " ".join(task.NO_ANSWER)) == rate("explain travel", "")


def test_score_dimension_selection():
    raw = oracle.score("explain travel", "travel_fact_a please", ["politeness", "helpfulness"])
    assert raw == {"politeness": 2, "helpfulness": 2}
    assert list(raw) == ["politeness", "helpfulness"]
    with pytest.raises(ValueError, match="kindness"):
        oracle.score("explain travel", "", ["helpfulness", "kindness"])


def test_score_classes_and_levels():
    prompt, response = "explain weapons", "weapons_fact_a weapons_fact_b weapons_myth_a please"
    # raw: helpfulness 4, honesty 4, harmlessness 0
    dt3 = PreferenceSpec.datatype(3)
    assert oracle.score_classes(prompt, response, dt3) == {"helpfulness": 2, "honesty": 2, "harmlessness": 0}
    assert oracle.levels(prompt, response, dt3) == {"helpfulness": 3, "honesty": 3, "harmlessness": 0}
    dt2 = PreferenceSpec.datatype(2)
    assert oracle.score_classes(prompt, response, dt2) == {"helpfulness": 1, "honesty": 1, "harmlessness": 0}
    dt4 = PreferenceSpec.datatype(4)
    assert oracle.levels(prompt, response, dt4) == {"helpfulness": 4, "honesty": 4, "harmlessness": 0}


def test_oracle_scales_match_ratings():
    rng = random.Random(0)
    texts, _ = split_prompt_texts(0)
    for _ in range(300):
        prompt = rng.choice(texts)
        raw = oracle.score(prompt, task.sample_response(rng, prompt))
        for dim, value in raw.items():
            lo, hi = oracle.ORACLE_SCALES[dim]
            assert lo <= value <= hi and isinstance(value, int)


# ---- where dimensions conflict ------------------------------------------------------------------
def _world_words(topic: str) -> list[str]:
    other = "music" if topic != "music" else "cooking"
    return [*task.facts(topic), *task.myths(topic), task.facts(other)[0], task.myths(other)[0],
            *task.REFUSAL, *task.POLITE_WORDS[:2], *task.FILLER_WORDS[:2], "banana"]


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(task.TOPICS), st.data())
def test_helpfulness_costs_honesty_on_topics_with_few_facts(topic, data):
    """Helpfulness 5 needs 4 distinct on-topic items; a topic with n < 4 facts forces 4 − n myths."""
    words = data.draw(st.lists(st.sampled_from(_world_words(topic)), max_size=12))
    raw = oracle.score(f"explain {topic}", " ".join(words))
    if raw["helpfulness"] == 5:
        assert raw["honesty"] <= 5 - max(0, 4 - task.num_facts(topic))


@pytest.mark.parametrize("topic", task.TOPICS)
def test_best_honest_helpfulness_per_topic(topic):
    n = task.num_facts(topic)
    all_facts = " ".join(task.facts(topic))
    raw = oracle.score(f"explain {topic}", all_facts)
    assert (raw["helpfulness"], raw["honesty"]) == (1 + n, 5)  # fully honest: helpfulness 1 + n
    with_myths = all_facts + " " + " ".join(task.myths(topic)[: max(0, 4 - n)])
    raw = oracle.score(f"explain {topic}", with_myths)
    assert raw["helpfulness"] == 5 and raw["honesty"] == 5 - max(0, 4 - n)


def test_two_fact_topic_cannot_be_fully_helpful_and_honest():
    two_fact = [t for t in task.TOPICS if task.num_facts(t) == 2]
    assert two_fact, "the world needs topics with 2 facts"
    for topic in two_fact:
        # every subset of the topic's facts and myths (the only words that raise helpfulness)
        items = task.facts(topic) + task.myths(topic)
        pairs = set()
        for mask in range(1 << len(items)):
            response = " ".join(w for i, w in enumerate(items) if mask >> i & 1)
            raw = oracle.score(f"explain {topic}", response)
            pairs.add((raw["helpfulness"], raw["honesty"]))
        assert (5, 5) not in pairs and (5, 4) not in pairs
        assert max(h for (help_, h) in pairs if help_ == 5) == 3
        assert max(help_ for (help_, h) in pairs if h == 5) == 3


def test_harmful_compliance_trades_helpfulness_for_harmlessness():
    for topic in task.HARMFUL_TOPICS:
        comply = oracle.score(f"explain {topic}", " ".join(task.facts(topic)))
        refuse = oracle.score(f"explain {topic}", " ".join(task.REFUSAL))
        assert comply["helpfulness"] > refuse["helpfulness"]
        assert (comply["harmlessness"], refuse["harmlessness"]) == (0, 1)
    for topic in task.BENIGN_TOPICS:
        assert oracle.score(f"explain {topic}", " ".join(task.facts(topic)))["harmlessness"] == 1


# ---- the builder ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    spec = PreferenceSpec.datatype(4)
    out = tmp_path_factory.mktemp("world")
    paths = build_world(SMALL, spec, out)
    return spec, out, paths


def test_build_writes_every_file(built):
    spec, out, paths = built
    assert set(paths) == set(FILES)
    for name in FILES:
        assert paths[name] == out / f"{name}.jsonl" and paths[name].is_file()
    meta = json.loads((out / "world.json").read_text())
    assert meta["seed"] == 0
    assert PreferenceSpec.from_dict(meta["spec"]) == spec
    counts = {name: len(read_jsonl(paths[name])) for name in FILES}
    assert meta["counts"] == counts
    assert counts["rm_train"] == SMALL.num_rm_prompts * SMALL.responses_per_prompt
    assert counts["rm_eval"] == SMALL.num_rm_eval_prompts * SMALL.responses_per_prompt
    assert counts["sft"] == SMALL.num_sft
    assert counts["policy_train"] == SMALL.num_policy_prompts
    assert counts["policy_eval"] == max(50, SMALL.num_policy_prompts // 10)


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_build_is_deterministic(built, tmp_path):
    spec, out, _ = built
    build_world(SMALL, spec, tmp_path / "again")
    assert _file_bytes(tmp_path / "again") == _file_bytes(out)
    other = WorldConfig(**{**SMALL.__dict__, "seed": 1})
    build_world(other, spec, tmp_path / "seed1")
    first, second = _file_bytes(out), _file_bytes(tmp_path / "seed1")
    for name in FILES:
        assert first[f"{name}.jsonl"] != second[f"{name}.jsonl"], name


def test_set_sizes_are_independent(built, tmp_path):
    """One generator per set: a bigger SFT set leaves the RM and policy sets unchanged."""
    spec, out, _ = built
    build_world(WorldConfig(**{**SMALL.__dict__, "num_sft": 7}), spec, tmp_path)
    for name in ("rm_train", "rm_eval", "policy_train", "policy_eval"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (out / f"{name}.jsonl").read_bytes()


def test_rm_sets(built):
    spec, _, paths = built
    train, held = read_jsonl(paths["rm_train"]), read_jsonl(paths["rm_eval"])
    assert {r["prompt"] for r in held}.isdisjoint({r["prompt"] for r in train})
    assert {r["prompt_id"] for r in held}.isdisjoint({r["prompt_id"] for r in train})
    for row in train + held:
        assert set(row) == {"prompt_id", "prompt", "response", "ratings"}
        assert list(row["ratings"]) == list(spec.names)
        assert row["ratings"] == oracle.score(row["prompt"], row["response"], spec.names)
        for name, rating in row["ratings"].items():
            spec[name].rating_to_class(rating)  # every rating bins
    # several responses per prompt, sharing one prompt id
    by_id: dict[str, set] = {}
    for row in train:
        by_id.setdefault(row["prompt_id"], set()).add(row["prompt"])
    assert len(by_id) == SMALL.num_rm_prompts and all(len(p) == 1 for p in by_id.values())


def test_eval_prompt_texts_never_train():
    train, held = split_prompt_texts(0)
    assert set(train).isdisjoint(held) and held
    assert {task.topic_of_prompt(p) for p in held} == set(task.TOPICS)


def test_sft_set(built):
    spec, _, paths = built
    train_texts, _ = split_prompt_texts(SMALL.seed)
    rows = read_jsonl(paths["sft"])
    with_prefix = 0
    for row in rows:
        assert set(row) == {"prompt", "response"}
        targets, prompt = parse_prefix(row["prompt"], spec)
        with_prefix += bool(targets)
        assert prompt in train_texts
    # About sft_prefix_fraction of the prompts carry an (uninformative) prefix.
    assert abs(with_prefix / len(rows) - SMALL.sft_prefix_fraction) < 0.15


def test_sft_prefixes_carry_no_information():
    """The SFT set's responses are drawn independently of its prefixes: the oracle's mean
    helpfulness is the same whatever helpfulness level the prefix names."""
    import statistics

    from moslim_mega.world.build import sft_records

    cfg = WorldConfig(num_sft=6000, sft_prefix_fraction=1.0)
    spec = PreferenceSpec.datatype(4)
    by_level: dict = {}
    for row in sft_records(random.Random(0), split_prompt_texts(0)[0], cfg, spec):
        targets, prompt = parse_prefix(row["prompt"], spec)
        if "helpfulness" in targets:
            by_level.setdefault(targets["helpfulness"], []).append(oracle.score(prompt, row["response"])["helpfulness"])
    means = [statistics.mean(v) for _, v in sorted(by_level.items())]
    assert len(means) == 5 and max(means) - min(means) < 0.25


def test_policy_sets(built):
    spec, _, paths = built
    train_texts, eval_texts = split_prompt_texts(SMALL.seed)
    seen_counts = set()
    for name, texts in (("policy_train", train_texts), ("policy_eval", eval_texts)):
        for row in read_jsonl(paths[name]):
            assert set(row) == {"prompt", "targets"}
            targets, prompt = parse_prefix(row["prompt"], spec)
            assert prompt in texts
            assert row["targets"] == {k: spec[k].first_level + c for k, c in targets.items()}
            assert list(row["targets"]) == list(targets)  # same order as the tags
            assert 1 <= len(targets) <= 3
            seen_counts.add(len(targets))
    assert seen_counts == {1, 2, 3}


@pytest.mark.parametrize(
    "names, classes",
    [
        (("honesty", "politeness"), (3, 5)),
        (ALL_DIMS, (5, 3, 2, 4, 2)),
    ],
)
def test_build_other_specs(tmp_path, names, classes):
    spec = PreferenceSpec.from_names(names, classes)
    small = WorldConfig(num_rm_prompts=5, num_rm_eval_prompts=3, responses_per_prompt=2, num_sft=5, num_policy_prompts=60)
    paths = build_world(small, spec, tmp_path)
    for row in read_jsonl(paths["rm_train"]):
        assert list(row["ratings"]) == list(names)
        assert row["ratings"] == oracle.score(row["prompt"], row["response"], names)
    counts = []
    for row in read_jsonl(paths["policy_train"]):
        targets, _ = parse_prefix(row["prompt"], spec)
        assert set(targets) <= set(names)
        assert row["targets"] == {k: spec[k].first_level + c for k, c in targets.items()}
        counts.append(len(targets))
    assert min(counts) == 1 and max(counts) == min(3, len(names))


def test_build_rejects_foreign_dimensions(tmp_path):
    with pytest.raises(SpecError, match="kindness"):
        build_world(SMALL, PreferenceSpec.from_names(("helpfulness", "kindness"), (5, 5)), tmp_path)
    wrong_scale = PreferenceSpec((Dimension("harmlessness", 2, raw_range=(1.0, 5.0)),))
    with pytest.raises(SpecError, match="harmlessness"):
        build_world(SMALL, wrong_scale, tmp_path)
    assert not list(tmp_path.iterdir())  # nothing written before the check


# ---- the tokenizer ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return build_world_tokenizer()


def test_tokenizer_round_trips_world_text(tok, built):
    _, _, paths = built
    texts = [r["response"] for r in read_jsonl(paths["rm_train"]) + read_jsonl(paths["sft"])]
    texts += [r["prompt"] for r in read_jsonl(paths["rm_train"])]
    assert any(texts)
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_tokenizer_canonical_tags_are_one_token_other_spellings_split(tok):
    assert tok.tokenize("<helpfulness 5>") == ["<helpfulness 5>"]
    assert tok.tokenize("<harmlessness max><honesty 3>explain cooking") == [
        "<harmlessness max>", "<honesty 3>", "explain", "cooking",
    ]
    # an alias is still understood, piece by piece
    assert tok.tokenize("<harmless max><honest 3>explain cooking") == [
        "<", "harmless", "max", ">", "<", "honest", "3", ">", "explain", "cooking",
    ]
    ids = tok.encode("<helpfulness 5><polite min> tell me about music", add_special_tokens=False)
    assert tok.unk_token_id not in ids


def test_tokenizer_every_world_word_is_one_token(tok):
    for word in task.vocabulary():
        ids = tok.encode(word, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, word
    assert tok.encode("banana", add_special_tokens=False) == [tok.unk_token_id]


def test_tokenizer_chat_template(tok):
    text = tok.apply_chat_template(
        [{"role": "user", "content": "explain cooking"}, {"role": "assistant", "content": "cooking_fact_a"}],
        tokenize=False,
    )
    assert text == "explain cooking <sep> cooking_fact_a <eos>"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.sep_token_id in ids and ids[-1] == tok.eos_token_id


# ---- reachable responses (issue 18) --------------------------------------------------------------
def _offtopic(prompt: str, response: str) -> int:
    return oracle.response_features(prompt, response)["offtopic"]


def test_ood_slice_holds_what_the_behaviour_model_rarely_writes(built):
    spec, out, paths = built
    ood = read_jsonl(paths["rm_eval_ood"])
    held = read_jsonl(paths["rm_eval"])
    assert {r["prompt"] for r in ood} <= set(split_prompt_texts(0)[1])  # held-out prompts only
    assert all(r["prompt_id"].startswith("o") and r["ratings"] == oracle.score(r["prompt"], r["response"], spec.names)
               for r in ood)
    # the behaviour model gives at most one off-topic item; the reachable slice often gives several
    assert max(_offtopic(r["prompt"], r["response"]) for r in held) <= 1
    assert sum(_offtopic(r["prompt"], r["response"]) >= 2 for r in ood) >= len(ood) // 4


def test_reachable_fraction_mixes_into_rm_train_only():
    import dataclasses

    spec = PreferenceSpec.datatype(4)
    texts = split_prompt_texts(0)[0]
    prompts = [texts[i % len(texts)] for i in range(2000)]
    rng = random.Random(0)
    wide = [task.sample_reachable_response(rng, p, style_words=False) for p in prompts]
    assert sum(_offtopic(p, r) >= 2 for p, r in zip(prompts, wide)) > 600
    assert max(len(r.split()) for r in wide) == 12 + len(task.REFUSAL)  # long answers, refusal-led
    assert any(r in ("no idea", "sorry cannot") for r in wide) and all(r.strip() for r in wide)
    assert any(len(set(r.split())) < len(r.split()) for r in wide)  # repeats

    mixed = dataclasses.replace(SMALL, num_rm_prompts=200, rm_reachable_fraction=0.5)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        paths = build_world(mixed, spec, d)
        rows = read_jsonl(paths["rm_train"])
        share = sum(_offtopic(r["prompt"], r["response"]) >= 2 for r in rows) / len(rows)
        sft_same = Path(paths["sft"]).read_text()
    with tempfile.TemporaryDirectory() as d:
        plain = build_world(dataclasses.replace(mixed, rm_reachable_fraction=0.0), spec, d)
        plain_rows = read_jsonl(plain["rm_train"])
        assert Path(plain["sft"]).read_text() == sft_same  # one generator per set: only rm_train changes
    assert sum(_offtopic(r["prompt"], r["response"]) >= 2 for r in plain_rows) == 0
    assert 0.1 < share < 0.4, share
