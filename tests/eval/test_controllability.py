"""Oracle-measured controllability (moslim_mega/eval/controllability.py) with hand-written test policies."""

from __future__ import annotations

import itertools
import json
import math
import random

import numpy as np
import pytest
from scipy import stats

from moslim_mega.eval.controllability import EvalError, compare_to_reference, evaluate_policy, spearman
from moslim_mega.prefs import PreferenceSpec, parse_prefix
from moslim_mega.world import oracle, task
from moslim_mega.world.build import policy_records, split_prompt_texts

SPEC4 = PreferenceSpec.datatype(4)  # helpfulness 5, honesty 5, harmlessness 2 classes
HELD_OUT = split_prompt_texts(0)[1]  # every topic, harmful ones included
N = 24


# ---- test policies ------------------------------------------------------------------------------
def respond(base: str, raw: dict[str, int]) -> str:
    """A response whose oracle ratings are the requested raw ratings, where the world allows it.

    Unnamed content dims default to "all facts, no myths"; harmlessness 1 on a harmful topic
    overrides helpfulness (refuse, no content). Helpfulness h emits h-1 facts when available and
    fills with myths, honesty o states 5-o myths.
    """
    topic = task.topic_of_prompt(base)
    nf = task.num_facts(topic)
    if "helpfulness" in raw:
        content = raw["helpfulness"] - 1
        if "honesty" in raw:  # honesty wins the conflict on topics with few facts
            n_myths = min(5 - raw["honesty"], content)
            n_facts = min(nf, content - n_myths)
        else:
            n_facts = min(nf, content)
            n_myths = content - n_facts
    else:
        n_facts, n_myths = nf, 5 - raw.get("honesty", 5)
    words = []
    if task.is_harmful(topic) and raw.get("harmlessness") == 1:
        words, n_facts, n_myths = list(task.REFUSAL), 0, 0
    elif task.is_harmful(topic) and raw.get("harmlessness") == 0 and n_facts + n_myths == 0:
        n_facts = 1
    words += list(task.facts(topic)[:n_facts]) + list(task.myths(topic)[:n_myths])
    words += list(task.POLITE_WORDS[: raw.get("politeness", 1) - 1])
    words += list(task.FILLER_WORDS[: 5 - raw.get("conciseness", 5)])
    return " ".join(words or task.NO_ANSWER)


def following_policy(spec: PreferenceSpec):
    """Reads the prefix and aims at the top raw rating of each target class."""

    def sample(prompts: list[str]) -> list[str]:
        out = []
        for p in prompts:
            classes, base = parse_prefix(p, spec)
            raw = {n: int(spec[n].bin_edges[c]) for n, c in classes.items()}
            out.append(respond(base, raw))
        return out

    return sample


def ignoring_policy(spec: PreferenceSpec):
    """Same response for a base prompt whatever the prefix says."""

    def sample(prompts):
        return [respond(parse_prefix(p, spec)[1], {}) for p in prompts]

    return sample


def random_policy(spec: PreferenceSpec, seed: int = 0):
    """Samples the world's broad behaviour distribution, prefix ignored."""
    rng = random.Random(seed)

    def sample(prompts):
        return [task.sample_response(rng, parse_prefix(p, spec)[1]) for p in prompts]

    return sample


# ---- spearman -------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_spearman_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 200))
    x = rng.integers(0, 4, size=n).astype(float)  # heavy ties
    y = x * rng.uniform(-1, 1) + rng.integers(0, 6, size=n)
    x[:2] = (0.0, 1.0)  # never a constant draw
    y = x * rng.uniform(-1, 1) + rng.integers(0, 6, size=n)
    assert len(set(y)) >= 2
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    z = rng.normal(size=n)
    assert spearman(z, y) == pytest.approx(stats.spearmanr(z, y).statistic, abs=1e-12)


def test_spearman_edge_cases():
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1, 2, 3], [4, 4, 4]))
    assert math.isnan(spearman([1], [2]))
    with pytest.raises(EvalError, match="3 values but y has 2"):
        spearman([1, 2, 3], [1, 2])


# ---- evaluate_policy -------------------------------------------------------------------------------
def test_following_policy_is_controllable():
    res = evaluate_policy(following_policy(SPEC4), HELD_OUT, SPEC4, prompts_per_target=N, seed=3)
    ctrl = res["controllability"]
    for d in ("helpfulness", "honesty"):
        assert ctrl[d]["targets"] == [1, 2, 3, 4, 5]
        assert ctrl[d]["spearman"] >= 0.9
        assert ctrl[d]["spearman_means"] >= 0.9
        # Single-dim targets are always reachable in the world: achieved == target level.
        assert ctrl[d]["achieved"] == pytest.approx([1, 2, 3, 4, 5])
    assert ctrl["harmlessness"]["targets"] == [0, 1]
    assert res["targeted_max"]["harmlessness"] == 1.0
    assert res["untargeted"]["harmlessness"] < res["targeted_max"]["harmlessness"]  # harmful prompts drawn
    assert res["targeted_max"] == {d: ctrl[d]["achieved"][-1] for d in SPEC4.names}
    assert set(ctrl["honesty"]["all_dims"]) == set(SPEC4.names)
    assert ctrl["honesty"]["all_dims"]["honesty"] == ctrl["honesty"]["achieved"]
    assert set(res["pairs"]) == {"helpfulness+honesty", "helpfulness+harmlessness", "honesty+harmlessness"}
    for scores in res["pairs"].values():
        assert set(scores) == set(SPEC4.names)
    # The helpfulness/honesty conflict: 2-3-fact topics cannot reach 5/5, so the pair mean is < 5.
    assert res["pairs"]["helpfulness+honesty"]["honesty"] == 5.0
    assert res["pairs"]["helpfulness+honesty"]["helpfulness"] < 5.0
    # 3 dims: 5 + 5 + 2 sweep points, 3 pairs, 1 untargeted.
    assert res["num_prompts"] == N * (12 + 3 + 1)


def test_prefix_ignoring_policy_has_no_control():
    res = evaluate_policy(ignoring_policy(SPEC4), HELD_OUT, SPEC4, prompts_per_target=N, seed=3)
    for d in SPEC4.names:
        c = res["controllability"][d]
        # Same responses at every level: zero rank covariance, constant means.
        assert c["spearman"] == pytest.approx(0.0, abs=1e-9) or math.isnan(c["spearman"])
        assert math.isnan(c["spearman_means"])
    res = evaluate_policy(random_policy(SPEC4), HELD_OUT, SPEC4, prompts_per_target=60, seed=3)
    for d in ("helpfulness", "honesty"):
        assert abs(res["controllability"][d]["spearman"]) < 0.25


def test_same_prompts_at_every_target_and_scored_without_prefix():
    seen: list[list[str]] = []

    def recording(prompts):
        seen.append(list(prompts))
        return following_policy(SPEC4)(prompts)

    res = evaluate_policy(recording, HELD_OUT, SPEC4, prompts_per_target=5, seed=11, batch_size=5)
    assert len(seen) == res["num_prompts"] // 5  # one call per target point at batch_size=5
    bases = [[parse_prefix(p, SPEC4)[1] for p in call] for call in seen]
    assert all(b == bases[0] for b in bases)
    prefixes = [call[0][: call[0].index(bases[0][0])] for call in seen]
    assert prefixes[:3] == ["<helpfulness 1>", "<helpfulness 2>", "<helpfulness 3>"]
    assert "<helpfulness 5><honesty 5>" in prefixes and prefixes[-1] == ""
    # <helpfulness 1> means no content, which is harmless even on harmful prompts.
    assert res["controllability"]["helpfulness"]["all_dims"]["harmlessness"][0] == 1.0


def test_more_prompts_than_base_prompts_uses_replacement():
    res = evaluate_policy(following_policy(SPEC4), HELD_OUT[:3], SPEC4, prompts_per_target=10, seed=0)
    assert res["num_prompts"] == 10 * 16


def test_determinism():
    a = evaluate_policy(following_policy(SPEC4), HELD_OUT, SPEC4, prompts_per_target=8, seed=5)
    b = evaluate_policy(following_policy(SPEC4), HELD_OUT, SPEC4, prompts_per_target=8, seed=5)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = evaluate_policy(random_policy(SPEC4, 1), HELD_OUT, SPEC4, prompts_per_target=8, seed=5)
    d = evaluate_policy(random_policy(SPEC4, 1), HELD_OUT, SPEC4, prompts_per_target=8, seed=5)
    e = evaluate_policy(random_policy(SPEC4, 1), HELD_OUT, SPEC4, prompts_per_target=8, seed=6)
    assert json.dumps(c, sort_keys=True) == json.dumps(d, sort_keys=True)
    assert json.dumps(c, sort_keys=True) != json.dumps(e, sort_keys=True)


def test_random_targets_perfect_policy_has_zero_error():
    # helpfulness/politeness/conciseness never conflict, so every random target is achievable;
    # 3 and 2 classes check that errors are measured in the spec's level space, not raw ratings.
    spec = PreferenceSpec.from_names(("helpfulness", "politeness", "conciseness"), (5, 3, 2))
    records = policy_records(random.Random(0), HELD_OUT, 60, 0.3, spec)
    res = evaluate_policy(following_policy(spec), HELD_OUT, spec, 4, seed=0, targeted_prompts=records)
    rt = res["random_targets"]
    assert rt["num_records"] == 60
    assert set(rt["mae"]) == set(spec.names)
    assert rt["mae"] == {d: 0.0 for d in spec.names}
    assert rt["mae_mean"] == 0.0
    assert rt["exact"] == {d: 1.0 for d in spec.names}
    assert res["controllability"]["politeness"]["targets"] == [1, 2, 3]
    assert res["controllability"]["politeness"]["achieved"] == pytest.approx([2, 3, 5])  # bin tops on 1-5


def test_random_targets_errors_of_ignoring_policy():
    records = policy_records(random.Random(1), HELD_OUT, 80, 0.3, SPEC4)
    res = evaluate_policy(ignoring_policy(SPEC4), HELD_OUT, SPEC4, 2, seed=0, targeted_prompts=records)
    rt = res["random_targets"]
    # Recompute by hand: the ignoring policy always gives all facts, no myths.
    expected: dict[str, list[int]] = {d: [] for d in SPEC4.names}
    for r in records:
        base = parse_prefix(r["prompt"], SPEC4)[1]
        got = oracle.levels(base, respond(base, {}), SPEC4)
        for d, level in r["targets"].items():
            expected[d].append(abs(got[d] - level))
    assert rt["mae"] == pytest.approx({d: float(np.mean(e)) for d, e in expected.items()})
    assert rt["mae_mean"] == pytest.approx(np.mean([np.mean(e) for e in expected.values()]))
    assert rt["mae"]["honesty"] > 1.0


def test_invalid_inputs():
    pol = following_policy(SPEC4)
    with pytest.raises(EvalError, match="already carries a preference prefix"):
        evaluate_policy(pol, ["<honesty 3>explain travel"], SPEC4, 2, 0)
    with pytest.raises(EvalError, match="prompts_per_target"):
        evaluate_policy(pol, HELD_OUT, SPEC4, 0, 0)
    with pytest.raises(EvalError, match="returned 1 responses"):
        evaluate_policy(lambda ps: ["no idea"], HELD_OUT, SPEC4, 2, 0)
    bad = [{"prompt": "<honesty 3>explain travel", "targets": {"honesty": 4}}]
    with pytest.raises(EvalError, match=r"targeted_prompts\[0\]"):
        evaluate_policy(pol, HELD_OUT, SPEC4, 2, 0, targeted_prompts=bad)


def test_compare_to_reference():
    moslim = evaluate_policy(following_policy(SPEC4), HELD_OUT, SPEC4, 8, 0)
    sft = evaluate_policy(ignoring_policy(SPEC4), HELD_OUT, SPEC4, 8, 0)
    cmp = compare_to_reference(moslim, sft)
    for d in SPEC4.names:
        row = cmp["dims"][d]
        assert row["moslim"] == moslim["targeted_max"][d]
        assert row["sft"] == sft["targeted_max"][d]
        assert row["delta"] == pytest.approx(row["moslim"] - row["sft"])
    assert cmp["named_mean"]["moslim"] == pytest.approx(np.mean(list(moslim["targeted_max"].values())))
    assert cmp["named_mean"]["sft"] == pytest.approx(np.mean(list(sft["targeted_max"].values())))
    assert cmp["named_mean"]["moslim"] > cmp["named_mean"]["sft"]
    assert 0.0 <= cmp["named_mean_normalised"]["sft"] < cmp["named_mean_normalised"]["moslim"] <= 1.0
    assert cmp["spearman"]["honesty"]["moslim"] >= 0.9
    bare = compare_to_reference(moslim["targeted_max"], sft["targeted_max"])
    assert bare["dims"] == cmp["dims"]
    with pytest.raises(EvalError, match="no dimension 'honesty'"):
        compare_to_reference({"honesty": 3.0}, {"helpfulness": 2.0})


def test_pair_keys_cover_all_unordered_pairs():
    names = ("helpfulness", "honesty", "harmlessness", "politeness", "conciseness")
    spec = PreferenceSpec.from_names(names, (5, 5, 2, 5, 5))
    res = evaluate_policy(following_policy(spec), HELD_OUT, spec, prompts_per_target=2, seed=0)
    assert list(res["pairs"]) == [f"{a}+{b}" for a, b in itertools.combinations(spec.names, 2)]
    assert res["pairs"]["politeness+conciseness"]["politeness"] == 5.0
    assert res["pairs"]["politeness+conciseness"]["conciseness"] == 5.0
