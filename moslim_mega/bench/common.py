"""Pieces every suite shares: record checks that skip-and-report, and small summaries."""

from __future__ import annotations

from dataclasses import dataclass, field

from .judges import JudgeError, TextJudge


@dataclass
class Skips:
    """Records a suite could not use, each with its reason (reported, never silently dropped)."""

    rows: list[dict] = field(default_factory=list)

    def add(self, index: int, record, reason: str) -> None:
        rid = record.get("id", record.get("question_id")) if isinstance(record, dict) else None
        self.rows.append({"index": index, "id": rid, "reason": reason})

    def report(self) -> dict:
        return {"num_skipped": len(self.rows), "skipped": self.rows}


def require_str(rec, key: str, allow_empty: bool = False) -> str | None:
    """The record's string field, or None (missing, not a string, or empty)."""
    if not isinstance(rec, dict):
        return None
    v = rec.get(key)
    if not isinstance(v, str) or (not allow_empty and not v.strip()):
        return None
    return v


def missing_reason(rec, key: str) -> str:
    if not isinstance(rec, dict):
        return f"not a JSON object ({type(rec).__name__})"
    if key not in rec:
        return f"missing field {key!r}"
    v = rec[key]
    if not isinstance(v, str):
        return f"field {key!r} is {type(v).__name__}, expected a string"
    return f"field {key!r} is empty"


def require_text_judge(judge, suite: str) -> TextJudge:
    if not isinstance(judge, TextJudge):
        kind = getattr(judge, "kind", None) if judge is not None else "none"
        raise JudgeError(
            f"suite {suite} needs a text judge (--judge openai:URL#MODEL or hf:PATH); got {kind!r}"
            + (": a reward model gives a score, not per-turn ratings or statement verdicts" if kind == "rm" else "")
        )
    return judge


def mean(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def with_prefix(prefix: str, text: str) -> str:
    """The preference prefix goes at the very start of the prompt (the grammar requires it)."""
    return prefix + text if prefix else text


def unparseable_report(examples: list[dict], total: int) -> dict:
    """How many verdicts could not be parsed, with a few examples so the user can see why."""
    return {"num_verdicts": total, "num_unparseable": len(examples), "unparseable_examples": examples[:5]}
