"""The preference-prefix grammar, DataType presets and rating binning (moslim_mega/prefs.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moslim_mega.config import PrefsConfig
from moslim_mega.prefs import (
    DATATYPE_CLASSES,
    Dimension,
    LabelError,
    PreferenceSpec,
    PrefixError,
    SpecError,
    check_plain_prompt,
    format_prefix,
    parse_prefix,
    spec_from_config,
    strip_prefix,
    targets_to_tensor,
)

NAMES = ("helpfulness", "honesty", "harmlessness", "politeness", "conciseness")
ALIASES = {
    "helpfulness": ("helpful", "help"),
    "honesty": ("honest",),
    "harmlessness": ("harmless",),
    "politeness": ("polite",),
    "conciseness": ("concise",),
}


# ---- strategies ---------------------------------------------------------------------------
@st.composite
def specs(draw) -> PreferenceSpec:
    """2-5 of the world's dimensions in any order, 1-7 classes each, level 1 or 0 first.

    Dimensions are built directly with a raw range wide enough for 7 classes: the grammar does
    not depend on how raw ratings bin (``from_names`` rightly refuses 7 classes on a 1-5 scale).
    """
    names = draw(st.lists(st.sampled_from(NAMES), min_size=2, max_size=5, unique=True))
    dims = []
    for name in names:
        k = draw(st.integers(1, 7))
        first = draw(st.sampled_from((0, 1)))
        dims.append(Dimension(name, k, first_level=first, aliases=ALIASES[name], raw_range=(1.0, 7.0)))
    return PreferenceSpec(tuple(dims))


@st.composite
def spec_and_targets(draw):
    spec = draw(specs())
    chosen = draw(st.lists(st.sampled_from(spec.names), unique=True, max_size=len(spec)))
    targets = {n: draw(st.integers(0, spec[n].num_classes - 1)) for n in chosen}
    return spec, targets


# Real prompts open with markup (UltraFeedback, hh-rlhf, MT-Bench, RewardBench: HTML, XML, JSX,
# chat-template tokens). None of these is a preference tag: no dimension name or alias of any
# spec below, and no '<word level>' shape.
MARKUP_OPENERS = (
    "<div>", "<div class=\"note\">", "<html lang=\"en\">", "<!DOCTYPE html>", "<?xml version=\"1.0\"?>",
    "<code>", "<pre><code class=\"python\">", "<b>bold</b>", "<p>", "<br/>", "<br />", "<img src=\"a.png\">",
    "<table><tr><td>1</td></tr></table>", "<svg width=\"10\" height=\"10\">", "<script>", "<style>",
    "<a href=\"https://x.org\">", "<ul><li>", "<h1>Title</h1>", "<Button onClick={f}>", "<MyComponent />",
    "<React.Fragment>", "<root><item id=\"3\"/>", "<|im_start|>user\n", "<|endoftext|>", "<s>", "</s>",
    "</div>", "<!-- a comment -->", "<>", "<<", "<=", "<3 love it", "< not a tag", "<user>", "<system>",
    "<question>", "<doc_1>", "<T>", "<xsl:template match=\"/\">",
)
markup_tails = st.builds(lambda opener, rest: opener + rest, st.sampled_from(MARKUP_OPENERS), st.text())

# A prompt may contain anything, including '<' and tags later on. It may start with markup, but
# not with whitespace (parse_prefix drops whitespace after the prefix) or a bare '<' from
# st.text(), which could form a '<word level>' tag with what follows.
prompts = st.one_of(st.text().filter(lambda s: not s or not (s[0].isspace() or s[0] == "<")), markup_tails)


@st.composite
def spelled_prefix(draw, spec: PreferenceSpec, targets: dict[str, int]) -> str:
    """The same targets written the many ways the grammar allows: aliases, any letter case,
    ``max``/``min`` for the end classes, whitespace inside tags and between them."""
    parts = []
    ws = st.text(alphabet=" \t\n", max_size=3)
    for name, cls in targets.items():
        dim = spec[name]
        spelling = draw(st.sampled_from((name, *dim.aliases)))
        spelling = "".join(c.upper() if draw(st.booleans()) else c for c in spelling)
        words = [str(dim.first_level + cls)]
        if cls == dim.num_classes - 1:
            words.append(draw(st.sampled_from(("max", "MAX", "Max"))))
        if cls == 0:
            words.append(draw(st.sampled_from(("min", "MIN", "Min"))))
        level = draw(st.sampled_from(words))
        inner_ws = draw(st.text(alphabet=" \t", min_size=1, max_size=3))
        parts.append(draw(ws) + "<" + draw(ws) + spelling + inner_ws + level + draw(ws) + ">")
    return "".join(parts) + draw(ws)


# ---- properties ---------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(spec_and_targets(), prompts)
def test_format_parse_round_trip(st_, prompt):
    spec, targets = st_
    text = format_prefix(targets, spec) + prompt
    parsed, rest = parse_prefix(text, spec)
    assert (parsed, rest) == (targets, prompt)
    assert list(parsed) == list(targets)  # tag order is kept
    assert strip_prefix(text, spec) == prompt


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_every_spelling_parses_to_the_same_targets(data):
    spec, targets = data.draw(spec_and_targets())
    prompt = data.draw(prompts)
    text = data.draw(spelled_prefix(spec, targets)) + prompt
    assert parse_prefix(text, spec) == (targets, prompt)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_strip_never_leaves_a_tag(data):
    spec, targets = data.draw(spec_and_targets())
    # The "prompt" here is arbitrary text: it may start with whitespace, markup or more tags.
    markup = data.draw(st.booleans())
    tail = data.draw(markup_tails if markup else st.one_of(st.text(), st.text(alphabet="<> helpfulness12max", max_size=30)))
    text = data.draw(spelled_prefix(spec, targets)) + tail
    try:
        stripped = strip_prefix(text, spec)
    except PrefixError:
        assert not markup, f"markup tail {tail!r} read as a tag"
        # The prefix is well formed, so the error must come from the tail: a bad tag at its
        # start, or a valid one that repeats a dimension of the prefix.
        try:
            tail_targets, _ = parse_prefix(tail, spec)
        except PrefixError:
            return
        assert set(tail_targets) & set(targets), (text, tail_targets)
        return
    assert text.endswith(stripped)
    assert parse_prefix(stripped, spec) == ({}, stripped)
    assert strip_prefix(stripped, spec) == stripped
    assert not stripped[:1].isspace()
    if markup or not tail.lstrip().startswith("<"):
        assert stripped == tail.lstrip()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_markup_after_a_prefix_is_kept_as_prompt(data):
    """Tails that start with '<' but are markup, not tags, round-trip untouched."""
    spec, targets = data.draw(spec_and_targets())
    tail = data.draw(markup_tails)
    text = data.draw(spelled_prefix(spec, targets)) + tail
    assert parse_prefix(text, spec) == (targets, tail)
    assert strip_prefix(text, spec) == tail
    assert parse_prefix(tail, spec) == ({}, tail)  # and alone, with no prefix at all
    check_plain_prompt(tail, spec)


JUNK_FRAGMENTS = ("<", ">", "helpfulness", "harmless", "Honesty", "max", "min", "MAX", "-", "+",
                  "0", "1", "5", "7", "42", " ", "\t", "\n", "x", "<>", "٣", "\u00a0")
junk = st.one_of(
    st.text(),
    st.lists(st.sampled_from(JUNK_FRAGMENTS), max_size=20).map("".join),
    st.lists(st.one_of(st.sampled_from(JUNK_FRAGMENTS), st.text(max_size=3)), max_size=12).map("".join),
)


@settings(max_examples=500, deadline=None)
@given(junk, st.sampled_from([1, 2, 3, 4]))
def test_junk_parses_or_raises_prefix_error(text, datatype):
    spec = PreferenceSpec.datatype(datatype)
    try:
        targets, rest = parse_prefix(text, spec)
    except PrefixError:
        return
    except Exception as e:  # pragma: no cover - the failure we are looking for
        pytest.fail(f"{type(e).__name__} instead of PrefixError for {text!r}: {e}")
    assert set(targets) <= set(spec.names)
    for name, cls in targets.items():
        assert 0 <= cls < spec[name].num_classes
    assert text.endswith(rest)


# ---- examples: the grammar ------------------------------------------------------------------
@pytest.fixture
def dt4() -> PreferenceSpec:
    return PreferenceSpec.datatype(4)


def test_aliases_and_case(dt4):
    assert parse_prefix("<harmless 1>hi", dt4) == ({"harmlessness": 1}, "hi")
    assert parse_prefix("<HARMLESS 0><Helpful 2><honest 5>hi", dt4) == (
        {"harmlessness": 0, "helpfulness": 1, "honesty": 4},
        "hi",
    )
    assert parse_prefix("<HeLpFuLnEsS 3>x", dt4)[0] == {"helpfulness": 2}
    assert dt4.canonical("Harmless") == "harmlessness"


def test_max_and_min(dt4):
    assert parse_prefix("<helpfulness max><honesty min><harmless max>q", dt4) == (
        {"helpfulness": 4, "honesty": 0, "harmlessness": 1},
        "q",
    )
    assert parse_prefix("<harmless MIN><helpfulness Max>q", dt4)[0] == {"harmlessness": 0, "helpfulness": 4}
    dt1 = PreferenceSpec.datatype(1)
    assert parse_prefix("<helpfulness max>q", dt1)[0] == {"helpfulness": 0}  # one class: max == min
    assert parse_prefix("<helpfulness min>q", dt1)[0] == {"helpfulness": 0}


def test_whitespace_between_and_inside_tags(dt4):
    text = "  <helpfulness 5>  \n <  honesty\t3 >\t<harmless 1>   Tell me about cooking  "
    assert parse_prefix(text, dt4) == (
        {"helpfulness": 4, "honesty": 2, "harmlessness": 1},
        "Tell me about cooking  ",
    )


def test_no_prefix_and_later_tags_are_prompt(dt4):
    assert parse_prefix("Tell me <helpfulness 5>", dt4) == ({}, "Tell me <helpfulness 5>")
    assert parse_prefix("", dt4) == ({}, "")
    assert parse_prefix("<helpfulness 5>", dt4) == ({"helpfulness": 4}, "")


@pytest.mark.parametrize(
    "markup",
    ['<div class="q">What is 2+2?</div>', '<html lang="en"><body>hi</body></html>', "<|im_start|>user\nhi<|im_end|>",
     "<code>print(1)</code> what does it print?", "<!-- note -->fix this", "</s>continue", "<b>bold</b> text",
     "<>hi", "<3 thanks", "<Button onClick={go}>Go</Button>", "<?xml version=\"1.0\"?><a/>", "<T> generics",
     "<s>[INST] hi [/INST]", "<a 5 b>", "<helpfulnesses>"],
)
def test_markup_is_prompt_text(dt4, markup):
    assert parse_prefix(markup, dt4) == ({}, markup)
    assert parse_prefix("  \n" + markup, dt4) == ({}, markup)
    assert parse_prefix("<helpfulness 5><honesty min>\n" + markup, dt4) == ({"helpfulness": 4, "honesty": 0}, markup)
    assert strip_prefix("<harmless 1>" + markup, dt4) == markup
    check_plain_prompt(markup, dt4)


@pytest.mark.parametrize("text", ["<helpfulness 3>hi", " <Honest max> hi", "<foo 2>hi", "<helpful>hi", "<5 harmless>"])
def test_check_plain_prompt_refuses_tag_openers(dt4, text):
    with pytest.raises(PrefixError, match="preference tag"):
        check_plain_prompt(text, dt4)


@pytest.mark.parametrize(
    "text, tag",
    [
        ("<kindness 3>hi", "<kindness 3>"),  # unknown dimension
        ("<helpfulness 1><verbosity 2>hi", "<verbosity 2>"),
        ("<helpfulness 6>hi", "<helpfulness 6>"),  # out of range, 5 classes
        ("<helpfulness 0>hi", "<helpfulness 0>"),
        ("<helpfulness -1>hi", "<helpfulness -1>"),
        ("<harmless 2>hi", "<harmless 2>"),  # harmless levels are 0/1
        ("<honesty 5><harmless 2>hi", "<harmless 2>"),
        ("<helpfulness>hi", "<helpfulness>"),  # malformed
        ("<helpfulness five>hi", "<helpfulness five>"),
        ("<helpfulness 3 4>hi", "<helpfulness 3 4>"),
        ("<helpfulness 3.5>hi", "<helpfulness 3.5>"),
        ("<helpfulness mAx>hi", "<helpfulness mAx>"),
        ("<5 helpfulness>hi", "<5 helpfulness>"),  # the tag shape, words swapped
        ("<helpfulness 9><div>hi</div>", "<helpfulness 9>"),  # a known name: the tag must be valid
        ("<helpfulness><div>", "<helpfulness>"),
        ("<Helpful >hi", "<Helpful >"),
        ("<help.html>hi", "<help.html>"),  # a known alias as the tag's first word
        ("<honest advice, please", "<honest advice, please"),  # unterminated
        ("<foo 3>hi", "foo"),  # tag shape, unknown dimension
        ("<Foo max><div>", "Foo"),
        ("<helpfulnesses 3>hi", "helpfulnesses"),
        ("<helpfulness 5><verbosity min><p>hi", "verbosity"),
        ("<helpfulness 3", "<helpfulness 3"),  # unterminated
        ("<honesty 2><helpfulness 3", "<helpfulness 3"),
        ("<helpfulness 3><helpful 2>hi", "<helpful 2>"),  # repeated dimension (via an alias)
        ("<honesty 3><honesty 3>hi", "<honesty 3>"),
    ],
)
def test_errors_name_the_offending_tag(dt4, text, tag):
    with pytest.raises(PrefixError) as info:
        parse_prefix(text, dt4)
    assert tag in str(info.value)
    with pytest.raises(PrefixError):
        strip_prefix(text, dt4)


def test_huge_level_is_a_prefix_error(dt4):
    # int() refuses strings over 4300 digits with a plain ValueError; the grammar must not leak it.
    tag = "<helpfulness " + "9" * 5000 + ">"
    with pytest.raises(PrefixError, match="helpfulness"):
        parse_prefix(tag + "hi", dt4)


def test_non_string_prompt(dt4):
    with pytest.raises(PrefixError):
        parse_prefix(None, dt4)  # type: ignore[arg-type]


def test_format_prefix(dt4):
    assert format_prefix({"helpfulness": 4, "harmless": 0}, dt4) == "<helpfulness 5><harmlessness 0>"
    assert format_prefix({}, dt4) == ""


@pytest.mark.parametrize(
    "targets, needle",
    [
        ({"kindness": 1}, "kindness"),
        ({"helpfulness": 5}, "helpfulness"),  # class index, not level: 0..4
        ({"helpfulness": -1}, "helpfulness"),
        ({"harmlessness": 2}, "harmlessness"),
        ({"helpfulness": 1.0}, "helpfulness"),
        ({"helpfulness": True}, "helpfulness"),
        ({"helpfulness": 1, "helpful": 2}, "helpfulness"),  # the same dimension twice
    ],
)
def test_format_prefix_errors(dt4, targets, needle):
    with pytest.raises(PrefixError, match=needle):
        format_prefix(targets, dt4)


# ---- presets, binning, tensors, config --------------------------------------------------------
@pytest.mark.parametrize("n, classes", [(1, (1, 1, 2)), (2, (2, 2, 2)), (3, (3, 3, 2)), (4, (5, 5, 2))])
def test_datatype_presets(n, classes):
    spec = PreferenceSpec.datatype(n)
    assert DATATYPE_CLASSES[n] == classes
    assert spec.names == ("helpfulness", "honesty", "harmlessness")
    assert spec.num_classes == classes
    assert spec["harmless"].levels == range(0, 2)
    assert spec["helpfulness"].levels == range(1, 1 + classes[0])


@pytest.mark.parametrize("n", [0, 5, -1])
def test_datatype_unknown(n):
    with pytest.raises(SpecError, match=str(n)):
        PreferenceSpec.datatype(n)


@pytest.mark.parametrize(
    "n, expected",  # rating 1..5 → class, for helpfulness and honesty
    [
        (1, [0, 0, 0, 0, 0]),
        (2, [0, 0, 0, 1, 1]),
        (3, [0, 0, 1, 2, 2]),
        (4, [0, 1, 2, 3, 4]),
    ],
)
def test_rating_to_class_binning(n, expected):
    spec = PreferenceSpec.datatype(n)
    for name in ("helpfulness", "honesty"):
        assert [spec[name].rating_to_class(r) for r in (1, 2, 3, 4, 5)] == expected
        assert [spec[name].rating_to_class(float(r)) for r in (1, 2, 3, 4, 5)] == expected
        assert [spec[name].rating_to_class(str(r)) for r in (1, 2, 3, 4, 5)] == expected
    harmless = spec["harmlessness"]
    assert (harmless.rating_to_class(0), harmless.rating_to_class(1)) == (0, 1)
    assert (harmless.rating_to_class(False), harmless.rating_to_class(True)) == (0, 1)


def test_four_and_one_class_binning():
    four = PreferenceSpec.from_names(["honesty", "harmlessness"], [4, 1])
    assert four["honesty"].bin_edges == (1.0, 3.0, 4.0, 5.0)
    assert [four["honesty"].rating_to_class(r) for r in (1, 2, 3, 4, 5)] == [0, 1, 1, 2, 3]
    assert (four["harmless"].rating_to_class(0), four["harmless"].rating_to_class(1)) == (0, 0)


def test_bin_edges_between_ratings():
    dt2, dt3 = PreferenceSpec.datatype(2), PreferenceSpec.datatype(3)
    assert dt2["helpfulness"].bin_edges == (3.0, 5.0)
    assert dt3["helpfulness"].bin_edges == (2.0, 3.0, 5.0)
    assert dt2["helpfulness"].rating_to_class(3.0) == 0
    assert dt2["helpfulness"].rating_to_class(3.5) == 1
    assert dt3["helpfulness"].rating_to_class(2.5) == 1


def test_rating_to_class_accepts_numpy_scalars():
    dim = PreferenceSpec.datatype(3)["helpfulness"]
    assert dim.rating_to_class(np.int64(4)) == 2
    assert dim.rating_to_class(np.float32(1.0)) == 0


@pytest.mark.parametrize("bad", ["N/A", None, 7, 0, -1, math.nan, "nan", math.inf, "", [3], {"x": 1}])
def test_rating_to_class_errors(bad):
    dim = PreferenceSpec.datatype(4)["helpfulness"]
    with pytest.raises(LabelError, match="helpfulness"):
        dim.rating_to_class(bad)


@pytest.mark.parametrize("bad", [2, -1, "N/A", None, math.nan])
def test_harmless_rating_errors(bad):
    with pytest.raises(LabelError, match="harmlessness"):
        PreferenceSpec.datatype(4)["harmless"].rating_to_class(bad)


def test_targets_to_tensor(dt4):
    out = targets_to_tensor([{"helpfulness": 4, "harmless": 1}, {}, {"honesty": 0}], dt4)
    assert out.dtype == torch.long
    assert out.tolist() == [[4, -1, 1], [-1, -1, -1], [-1, 0, -1]]
    assert targets_to_tensor([], dt4).shape == (0, 3)
    with pytest.raises(PrefixError, match="kindness"):
        targets_to_tensor([{"kindness": 1}], dt4)


def test_from_names_resolves_aliases():
    spec = PreferenceSpec.from_names(["Helpful", "harmless"], [5, 2])
    assert spec.names == ("helpfulness", "harmlessness")
    assert spec["harmless"].raw_range == (0.0, 1.0) and spec["harmless"].first_level == 0


def test_spec_round_trips_through_dict():
    spec = PreferenceSpec.from_names(NAMES, [5, 3, 2, 4, 1])
    assert PreferenceSpec.from_dict(spec.to_dict()) == spec


def test_spec_from_config():
    assert spec_from_config(PrefsConfig()) == PreferenceSpec.datatype(4)
    assert spec_from_config(PrefsConfig(datatype=2)).num_classes == (2, 2, 2)
    spec = spec_from_config(PrefsConfig(datatype=1, dimensions=("politeness", "honesty"), num_classes=(4, 3)))
    assert spec.names == ("politeness", "honesty") and spec.num_classes == (4, 3)


@pytest.mark.parametrize(
    "cfg, needle",
    [
        (PrefsConfig(dimensions=("helpfulness", "honesty"), num_classes=(5,)), "num_classes"),
        (PrefsConfig(dimensions=("helpfulness",), num_classes=()), "num_classes"),
        (PrefsConfig(datatype=7), "datatype"),
        (PrefsConfig(dimensions=("helpfulness", "helpful"), num_classes=(5, 5)), "helpful"),
        (PrefsConfig(dimensions=("helpfulness",), num_classes=(0,)), "helpfulness"),
        (PrefsConfig(dimensions=("helpfulness",), num_classes=(6,)), "6 classes"),  # 1-5 scale
        (PrefsConfig(dimensions=("harmlessness",), num_classes=(3,)), "3 classes"),  # 0/1 scale
        (PrefsConfig(dimensions=("Bad-Name",), num_classes=(2,)), "bad-name"),
    ],
)
def test_spec_from_config_errors(cfg, needle):
    with pytest.raises(SpecError, match=needle):
        spec_from_config(cfg)


def test_dimension_validation():
    with pytest.raises(SpecError, match="bin edges"):
        Dimension("x", 3, bin_edges=(1.0, 5.0))
    with pytest.raises(SpecError, match="increasing"):
        Dimension("x", 2, bin_edges=(4.0, 2.0))
    with pytest.raises(SpecError, match="at least one"):
        PreferenceSpec(())
