"""A word-level tokenizer for the embedded world, built locally (no downloads).

Every world word, every dimension name/alias, the digits, ``max``/``min`` and the tag brackets
are single tokens. Each canonical tag (``<helpfulness 5>``, ``<honesty max>``, …) is also one
token — a control code, as in CTRL-style conditioning: a 2-layer model that must bind the
dimension token to a level token three positions later learns "level n → n−1 items" for every
dimension alike (measured: honesty ρ ≈ 0 after 1,500 RLOO steps), while one token per
(dimension, level) makes the binding a lookup. Other spellings (aliases, extra spaces, capitals)
still parse and tokenise piecewise: ``<``, ``helpful``, ``5``, ``>``.
It carries a chat template (``{prompt} <sep> {response} <eos>``) so that world models go through
the same ``apply_chat_template`` path as real HF models.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from . import task
from .oracle import ORACLE_SCALES

SPECIALS = ("<pad>", "<unk>", "<bos>", "<eos>", "<sep>")

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}{{ m['content'] }} <sep>"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }} <eos>{% endif %}"
    "{% endfor %}"
)


def world_vocabulary(extra_names=()) -> list[str]:
    from ..prefs import _DEFAULT_ALIASES

    words = list(SPECIALS) + task.vocabulary()
    for name in list(ORACLE_SCALES) + list(extra_names):
        words.append(name)
        words.extend(_DEFAULT_ALIASES.get(name, ()))
    words += [str(i) for i in range(10)] + ["max", "min", "<", ">", "-"]
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def build_world_tokenizer(extra_names=()) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(world_vocabulary(extra_names))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # Split on whitespace, then isolate tag brackets and digits so prefixes tokenise per part.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Split(Regex(r"[<>\-]|\d"), behavior="isolated"),
        ]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins tokens with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        sep_token="<sep>",
    )
    fast.add_tokens(tag_tokens(extra_names))
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tag_tokens(extra_names=()) -> list[str]:
    """One token per canonical tag: every dimension × levels 0-9, ``max`` and ``min``."""
    names = list(dict.fromkeys(list(ORACLE_SCALES) + list(extra_names)))
    return [f"<{n} {lv}>" for n in names for lv in [*map(str, range(10)), "max", "min"]]
