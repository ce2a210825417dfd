"""Parse judge verdicts. A verdict that cannot be parsed returns None; the suites count it.

Ratings (MT-Bench style, 1-10), tried in order, first match wins:
``[[7]]`` / ``[[7.5]]``, ``Rating: 7`` (also ``Score:``), ``7/10``. A number outside 1-10 is
unparseable, not clipped: clipping would hide a judge that misunderstood the scale.

Statement verdicts (HaluEval 2.0 style): every ``[[true]]``, ``[[false]]`` or ``[[unknown]]``
tag is one statement's verdict; ``[[none]]`` alone means "no factual statements".
"""

from __future__ import annotations

import re

RATING_MIN, RATING_MAX = 1.0, 10.0
_NUM = r"(\d+(?:\.\d+)?)"
_RATING_PATTERNS = (
    re.compile(r"\[\[\s*" + _NUM + r"\s*\]\]"),
    re.compile(r"\b(?:rating|score)\s*[:=]\s*\**\s*" + _NUM, re.IGNORECASE),
    re.compile(_NUM + r"\s*/\s*10\b"),
)
_STATEMENT_TAG = re.compile(r"\[\[\s*(true|false|unknown|none)\s*\]\]", re.IGNORECASE)
VERDICTS = ("true", "false", "unknown")


def parse_rating(text: str) -> float | None:
    """The 1-10 rating in a judge's text, or None."""
    if not isinstance(text, str):
        return None
    for pat in _RATING_PATTERNS:
        m = pat.search(text)
        if m:
            value = float(m.group(1))
            return value if RATING_MIN <= value <= RATING_MAX else None
    return None


def parse_statement_verdicts(text: str) -> list[str] | None:
    """Per-statement verdicts (``true``/``false``/``unknown``) in order; ``[]`` when the judge says
    ``[[none]]`` (no factual statement); None when unparseable (no tag, or ``none`` mixed with others)."""
    if not isinstance(text, str):
        return None
    tags = [t.lower() for t in _STATEMENT_TAG.findall(text)]
    if not tags:
        return None
    if "none" in tags:
        return [] if set(tags) == {"none"} else None
    return tags
