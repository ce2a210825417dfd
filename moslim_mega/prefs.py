"""Preference dimensions and the prompt-prefix grammar (paper §2.3, §3.2, Table 5).

A prefix is a run of ``<name level>`` tags at the very start of a prompt, e.g.
``<helpfulness 5><honesty 3>Tell me about cooking``. ``level`` is an integer in the
dimension's level range or ``max`` / ``min``; names are case-insensitive and may be aliases
(``harmless`` → ``harmlessness``). Targets are returned as *class indices* (0-based), which is
what the reward model's heads and the reward mapping (Eq. 11) use. A leading ``<`` opens a tag
only when its first word is a known name/alias or it has the ``<word level>`` shape; other markup
(``<div>``, ``<|im_start|>``, ``</s>``) is prompt text (see :func:`is_preference_tag`).

Public API: :class:`Dimension`, :class:`PreferenceSpec`, :func:`parse_prefix`,
:func:`format_prefix`, :func:`strip_prefix`, :func:`check_plain_prompt`,
:func:`is_preference_tag`, :func:`targets_to_tensor`, :class:`PrefixError`.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field

__all__ = [
    "Dimension",
    "PreferenceSpec",
    "PrefixError",
    "SpecError",
    "LabelError",
    "DATATYPE_CLASSES",
    "parse_prefix",
    "format_prefix",
    "strip_prefix",
    "check_plain_prompt",
    "is_preference_tag",
    "targets_to_tensor",
    "spec_from_config",
]


class PrefixError(ValueError):
    """A preference prefix that cannot be parsed; the message names the offending tag."""


class SpecError(ValueError):
    """An invalid preference specification (dimension names, class counts, bins)."""


class LabelError(ValueError):
    """A raw rating that cannot be turned into a class label; the message names the field."""


# Table 5: classes per head (helpfulness, honesty, harmlessness) for DataType 1-4.
DATATYPE_CLASSES: dict[int, tuple[int, int, int]] = {1: (1, 1, 2), 2: (2, 2, 2), 3: (3, 3, 2), 4: (5, 5, 2)}

# How a 1-5 rating (UltraFeedback scale) bins into K classes, as inclusive upper edges.
# The paper does not give the partition; these are ours: K=2 splits "good" (4-5) from the rest,
# K=3 keeps the middle rating on its own.
_FIVE_POINT_EDGES: dict[int, tuple[float, ...]] = {
    1: (5.0,),
    2: (3.0, 5.0),
    3: (2.0, 3.0, 5.0),
    5: (1.0, 2.0, 3.0, 4.0, 5.0),
}

_DEFAULT_ALIASES: dict[str, tuple[str, ...]] = {
    "helpfulness": ("helpful", "help"),
    "honesty": ("honest",),
    "harmlessness": ("harmless",),
    "politeness": ("polite",),
    "conciseness": ("concise",),
}

_ALIAS_TO_NAME: dict[str, str] = {a: name for name, aliases in _DEFAULT_ALIASES.items() for a in aliases}

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def even_bin_edges(lo: float, hi: float, num_classes: int) -> tuple[float, ...]:
    """Inclusive upper edges splitting the integer ratings lo..hi into ``num_classes`` bins."""
    if (lo, hi) == (1, 5) and num_classes in _FIVE_POINT_EDGES:
        return _FIVE_POINT_EDGES[num_classes]
    n = int(hi - lo + 1)
    if num_classes > n:
        raise SpecError(f"cannot split ratings {lo}..{hi} into {num_classes} classes")
    return tuple(float(lo - 1 + math.floor(n * (c + 1) / num_classes + 0.5)) for c in range(num_classes))


@dataclass(frozen=True)
class Dimension:
    """One preference dimension = one classification head of the reward model."""

    name: str
    """Canonical lower-case name, e.g. ``helpfulness``."""
    num_classes: int
    """K_i: the number of intensity classes of this head."""
    first_level: int = 1
    """The prefix level of class 0 (1 for 1-5 scales, 0 for harmless 0/1)."""
    aliases: tuple[str, ...] = ()
    """Other accepted spellings in prefixes and label files."""
    raw_range: tuple[float, float] = (1.0, 5.0)
    """Range of raw ratings in source data (UltraFeedback 1-5, UltraSafety 0-1)."""
    bin_edges: tuple[float, ...] = ()
    """Inclusive upper edge of each class on the raw scale; empty = even split of raw_range."""

    def __post_init__(self):
        if not _NAME_RE.match(self.name):
            raise SpecError(f"dimension name {self.name!r} must be lower-case letters, digits, '_'")
        if self.num_classes < 1:
            raise SpecError(f"dimension {self.name!r}: num_classes must be >= 1, got {self.num_classes}")
        if not self.bin_edges:
            object.__setattr__(self, "bin_edges", even_bin_edges(*self.raw_range, self.num_classes))
        if len(self.bin_edges) != self.num_classes:
            raise SpecError(
                f"dimension {self.name!r}: {len(self.bin_edges)} bin edges for {self.num_classes} classes"
            )
        if list(self.bin_edges) != sorted(self.bin_edges):
            raise SpecError(f"dimension {self.name!r}: bin_edges must be increasing")

    @property
    def levels(self) -> range:
        """Prefix levels, class 0 first."""
        return range(self.first_level, self.first_level + self.num_classes)

    def level_to_class(self, level: int) -> int:
        if level not in self.levels:
            raise PrefixError(
                f"level {level} out of range for {self.name!r}: expected "
                f"{self.levels.start}..{self.levels.stop - 1}, 'min' or 'max'"
            )
        return level - self.first_level

    def rating_to_class(self, rating) -> int:
        """Bin a raw rating into a class index; raises :class:`LabelError` when it cannot."""
        if isinstance(rating, bool):
            rating = int(rating)
        if not isinstance(rating, (numbers.Real, str)):  # numbers.Real also admits numpy scalars
            raise LabelError(f"rating for {self.name!r} must be a number, got {rating!r}")
        try:
            value = float(rating)
        except ValueError:
            raise LabelError(f"rating for {self.name!r} is not numeric: {rating!r}") from None
        lo, hi = self.raw_range
        if not (lo <= value <= hi) or math.isnan(value):
            raise LabelError(f"rating {rating!r} for {self.name!r} outside its range {lo}..{hi}")
        for cls, edge in enumerate(self.bin_edges):
            if value <= edge:
                return cls
        return self.num_classes - 1


@dataclass(frozen=True)
class PreferenceSpec:
    """The ordered set of preference dimensions (= reward-model heads)."""

    dimensions: tuple[Dimension, ...]
    _lookup: dict = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        if not self.dimensions:
            raise SpecError("a PreferenceSpec needs at least one dimension")
        lookup: dict[str, int] = {}
        for i, dim in enumerate(self.dimensions):
            for key in (dim.name, *dim.aliases):
                key = key.lower()
                if key in lookup:
                    raise SpecError(f"name or alias {key!r} is used by two dimensions")
                lookup[key] = i
        object.__setattr__(self, "_lookup", lookup)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_names(
        cls,
        names: tuple[str, ...] | list[str],
        num_classes: tuple[int, ...] | list[int],
        first_levels: dict[str, int] | None = None,
    ) -> "PreferenceSpec":
        """Build a spec from names and class counts, with default aliases and raw ranges."""
        if len(names) != len(num_classes):
            raise SpecError(f"{len(names)} dimension names but {len(num_classes)} class counts")
        dims = []
        for name, k in zip(names, num_classes):
            name = _ALIAS_TO_NAME.get(name.lower(), name.lower())  # `harmless` → `harmlessness`
            binary = name == "harmlessness"
            first = (first_levels or {}).get(name, 0 if binary else 1)
            dims.append(
                Dimension(
                    name=name,
                    num_classes=int(k),
                    first_level=first,
                    aliases=_DEFAULT_ALIASES.get(name, ()),
                    raw_range=(0.0, 1.0) if binary else (1.0, 5.0),
                )
            )
        return cls(tuple(dims))

    @classmethod
    def datatype(cls, n: int) -> "PreferenceSpec":
        """The paper's DataType 1-4 presets (Table 5) over helpfulness, honesty, harmlessness."""
        if n not in DATATYPE_CLASSES:
            raise SpecError(f"datatype must be one of {sorted(DATATYPE_CLASSES)}, got {n}")
        return cls.from_names(("helpfulness", "honesty", "harmlessness"), DATATYPE_CLASSES[n])

    def to_dict(self) -> dict:
        return {
            "dimensions": [
                {
                    "name": d.name,
                    "num_classes": d.num_classes,
                    "first_level": d.first_level,
                    "aliases": list(d.aliases),
                    "raw_range": list(d.raw_range),
                    "bin_edges": list(d.bin_edges),
                }
                for d in self.dimensions
            ]
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PreferenceSpec":
        try:
            return cls(
                tuple(
                    Dimension(
                        name=d["name"],
                        num_classes=int(d["num_classes"]),
                        first_level=int(d.get("first_level", 1)),
                        aliases=tuple(d.get("aliases", ())),
                        raw_range=tuple(d.get("raw_range", (1.0, 5.0))),
                        bin_edges=tuple(d.get("bin_edges", ())),
                    )
                    for d in data["dimensions"]
                )
            )
        except KeyError as e:
            raise SpecError(f"preference spec is missing field {e.args[0]!r}") from None

    # ---- queries ------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dimensions)

    @property
    def num_classes(self) -> tuple[int, ...]:
        return tuple(d.num_classes for d in self.dimensions)

    def __len__(self) -> int:
        return len(self.dimensions)

    def index(self, name: str) -> int:
        """Head index of a dimension name or alias; :class:`PrefixError` if unknown."""
        try:
            return self._lookup[name.lower()]
        except KeyError:
            raise PrefixError(f"unknown preference dimension {name!r}; known: {', '.join(self.names)}") from None

    def canonical(self, name: str) -> str:
        return self.dimensions[self.index(name)].name

    def __getitem__(self, name: str) -> Dimension:
        return self.dimensions[self.index(name)]


# ---- the grammar ------------------------------------------------------------------------
# Which leading ``<…>`` is a preference tag (the one rule every path uses, via parse_prefix):
#   1. its first word (the letters/digits/_ right after ``<`` and optional spaces) is a known
#      dimension name or alias of the spec — then it must be a valid tag, whatever follows; or
#   2. it has the tag shape ``<word level>`` (or the swapped ``<level word>``), level an integer,
#      ``max`` or ``min`` — then an unknown word is an error, not text.
# Anything else that starts with ``<`` — ``<div>``, ``<html lang="en">``, ``<|im_start|>``,
# ``<!-- -->``, ``</s>``, ``<3`` — is prompt text: real data (UltraFeedback, hh-rlhf, MT-Bench,
# RewardBench) has prompts that open with HTML, XML or JSX, and they must pass through.
_LEVEL = r"[+-]?\d+|max|min|MAX|MIN|Max|Min"
_WORD = r"[A-Za-z][A-Za-z0-9_]*"
_TAG_BODY_RE = re.compile(rf"^\s*({_WORD})\s+({_LEVEL})\s*$")
_TAG_NAME_RE = re.compile(rf"<\s*({_WORD})")
_TAG_SHAPE_RE = re.compile(rf"<\s*(?:{_WORD}\s+(?:{_LEVEL})|(?:{_LEVEL})\s+{_WORD})\s*>")
_SHOW = 60  # characters of a tag quoted in an error (a '>' may be far away)


def _show(tag: str) -> str:
    return repr(tag if len(tag) <= _SHOW else tag[:_SHOW] + "…")


def is_preference_tag(text: str, pos: int, spec: PreferenceSpec) -> bool:
    """Whether the ``<`` at ``text[pos]`` opens a preference tag (rules above) rather than text."""
    if not text.startswith("<", pos):
        return False
    m = _TAG_NAME_RE.match(text, pos)
    if m and m.group(1).lower() in spec._lookup:
        return True
    return _TAG_SHAPE_RE.match(text, pos) is not None


def _tag_to_class(tag: str, spec: PreferenceSpec) -> tuple[str, int]:
    """A complete preference tag ``<name level>`` → (canonical name, class index)."""
    m = _TAG_BODY_RE.match(tag[1:-1])
    if not m:
        raise PrefixError(
            f"malformed tag {_show(tag)}: expected '<name level>' with an integer level, 'max' or 'min'"
        )
    name, level = m.group(1), m.group(2).lower()
    try:
        dim = spec[name]
    except PrefixError as e:
        raise PrefixError(f"in tag {_show(tag)}: {e}") from None
    if level == "max":
        return dim.name, dim.num_classes - 1
    if level == "min":
        return dim.name, 0
    try:
        return dim.name, dim.level_to_class(int(level))
    except ValueError as e:  # PrefixError, or int() refusing a >4300-digit level
        raise PrefixError(f"in tag {_show(tag)}: {e}") from None


def parse_prefix(text: str, spec: PreferenceSpec) -> tuple[dict[str, int], str]:
    """Split ``text`` into (targets, prompt).

    targets maps canonical dimension name → class index, in the order the tags appear.
    The prompt is the text after the last tag with leading whitespace removed. A leading ``<``
    opens a tag only by the rule of :func:`is_preference_tag` (a known name, or the
    ``<word level>`` shape); such a tag must be valid. Other markup is returned as prompt text.
    """
    if not isinstance(text, str):
        raise PrefixError(f"prompt must be a string, got {type(text).__name__}")
    targets: dict[str, int] = {}
    pos = 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if not is_preference_tag(text, pos, spec):
            return targets, text[pos:]
        end = text.find(">", pos)
        if end < 0:
            raise PrefixError(f"unterminated tag {_show(text[pos:])}: missing '>'")
        tag = text[pos : end + 1]
        name, cls = _tag_to_class(tag, spec)
        if name in targets:
            raise PrefixError(f"tag {_show(tag)} repeats dimension {name!r}")
        targets[name] = cls
        pos = end + 1


def check_plain_prompt(text: str, spec: PreferenceSpec) -> None:
    """Raise :class:`PrefixError` if ``text``, meant as a prompt with no prefix (raw data, a
    benchmark prompt), would be read as starting with a preference tag — a tag would change
    its meaning (or fail) once a prefix is put before it or it is stripped."""
    pos = len(text) - len(text.lstrip())
    if is_preference_tag(text, pos, spec):
        end = text.find(">", pos)
        tag = text[pos : end + 1] if end >= 0 else text[pos:]
        raise PrefixError(f"prompt text starts with the preference tag {_show(tag)}; it cannot be used unprefixed")


def format_prefix(targets: dict[str, int], spec: PreferenceSpec) -> str:
    """Render targets (name or alias → class index) as ``<name level>`` tags, in dict order."""
    parts = []
    seen = set()
    for name, cls in targets.items():
        dim = spec[name]
        if dim.name in seen:
            raise PrefixError(f"dimension {dim.name!r} given twice")
        seen.add(dim.name)
        if isinstance(cls, bool) or not isinstance(cls, int) or not 0 <= cls < dim.num_classes:
            raise PrefixError(f"class index {cls!r} out of range for {dim.name!r} (0..{dim.num_classes - 1})")
        parts.append(f"<{dim.name} {dim.first_level + cls}>")
    return "".join(parts)


def strip_prefix(text: str, spec: PreferenceSpec) -> str:
    """The prompt without its preference prefix ("prompt alignment", paper §2.3)."""
    return parse_prefix(text, spec)[1]


def spec_from_config(prefs_cfg) -> PreferenceSpec:
    """A :class:`PreferenceSpec` from a ``PrefsConfig`` (explicit dimensions or a DataType preset)."""
    if prefs_cfg.dimensions:
        if len(prefs_cfg.num_classes) != len(prefs_cfg.dimensions):
            raise SpecError(
                f"prefs.num_classes has {len(prefs_cfg.num_classes)} entries for "
                f"{len(prefs_cfg.dimensions)} prefs.dimensions"
            )
        return PreferenceSpec.from_names(prefs_cfg.dimensions, prefs_cfg.num_classes)
    return PreferenceSpec.datatype(prefs_cfg.datatype)


def targets_to_tensor(targets_list: list[dict[str, int]], spec: PreferenceSpec):
    """Targets per example → ``[B, n_heads]`` long tensor, −1 where a dimension is not named."""
    import torch

    out_BH = torch.full((len(targets_list), len(spec)), -1, dtype=torch.long)
    for b, targets in enumerate(targets_list):
        for name, cls in targets.items():
            out_BH[b, spec.index(name)] = cls
    return out_BH
