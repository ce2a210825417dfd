"""Field access and rating parsing shared by the data builders: each failure is a
:class:`RowProblem` whose message ("kind: detail") becomes a drop reason in ``stats.json``."""

from __future__ import annotations

import math
import numbers

from .sources import BadJSON, Row


class RowProblem(Exception):
    """Internal: why one row/completion is dropped (becomes a DropLog entry)."""


def parse_rating(raw, field: str, lo: float, hi: float) -> float | None:
    """A rating as a float, ``None`` for ``"N/A"``; :class:`RowProblem` for anything else.

    Ratings are strings in the public files (``"4"``, ``"N/A"``); never compare them as strings.
    """
    if raw is None:
        raise RowProblem(f"missing field: {field}")
    if isinstance(raw, str):
        text = raw.strip()
        if text.upper() in ("N/A", "NA"):
            return None
        try:
            value = float(text)
        except ValueError:
            raise RowProblem(f"non-numeric rating: {field}={raw!r}") from None
    elif isinstance(raw, numbers.Real) and not isinstance(raw, bool):
        value = float(raw)
    else:
        raise RowProblem(f"non-numeric rating: {field}={raw!r}")
    if math.isnan(value) or not lo <= value <= hi:
        raise RowProblem(f"rating out of range: {field}={raw!r} (expected {lo:g}..{hi:g} or N/A)")
    return value


def get_field(obj: dict, key: str, field: str, kind: type | tuple = dict):
    """``obj[key]``, which must exist and have type ``kind``; :class:`RowProblem` otherwise."""
    if not isinstance(obj, dict):
        raise RowProblem(f"not an object: {field.rsplit('.', 1)[0]}")
    if key not in obj or obj[key] is None:
        raise RowProblem(f"missing field: {field}")
    value = obj[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RowProblem(f"wrong type: {field} must be {names}, got {type(value).__name__}")
    return value


def get_text(obj: dict, key: str, field: str) -> str:
    value = get_field(obj, key, field, str)
    if not value.strip():
        raise RowProblem(f"empty text: {field}")
    return value


def row_object(row: Row) -> dict:
    """The row's JSON object; :class:`RowProblem` for an invalid JSON line or a non-object row."""
    if isinstance(row.data, BadJSON):
        raise RowProblem(f"invalid JSON: {row.data.message}")
    if not isinstance(row.data, dict):
        raise RowProblem(f"not an object: row is {type(row.data).__name__}")
    return row.data
