"""What a data builder kept, what it dropped and why (written as ``stats.json``).

Every dropped record is listed with its source, its location (``file:line`` / ``split[i]``, plus
the completion index where a row holds several) and a reason; counters and per-head class
histograms sit beside the list, so a user can check the build against a hand count.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DropLog:
    """Dropped records and named counters of one build."""

    drops: list[dict] = field(default_factory=list)
    masked: list[dict] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)

    def drop(self, source: str, where: str, reason: str, completion: int | None = None) -> None:
        entry = {"source": source, "where": where, "reason": reason}
        if completion is not None:
            entry["completion"] = completion
        self.drops.append(entry)
        self.counts[f"{source}.dropped"] += 1

    def mask_head(self, source: str, where: str, head: str, reason: str, completion: int | None = None) -> None:
        """A kept record whose ``head`` label was unusable (masked, not dropped)."""
        entry = {"source": source, "where": where, "head": head, "reason": reason}
        if completion is not None:
            entry["completion"] = completion
        self.masked.append(entry)
        self.counts[f"{source}.masked.{head}"] += 1

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def reasons(self) -> dict[str, int]:
        """Number of drops per reason kind (the text before the first ':')."""
        return dict(Counter(d["reason"].split(":")[0] for d in self.drops))

    def to_dict(self) -> dict:
        return {"counts": dict(sorted(self.counts.items())), "drop_reasons": self.reasons(), "dropped": self.drops,
                "masked_heads": self.masked}


def class_histogram(labels: list[int], num_classes: int) -> dict:
    """``{"classes": [n_0, ..., n_{K-1}], "masked": n}`` for one head (−1 = masked)."""
    hist = [0] * num_classes
    masked = 0
    for c in labels:
        if c < 0:
            masked += 1
        else:
            hist[c] += 1
    return {"classes": hist, "masked": masked}


def write_stats(path: str | Path, stats: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=2, ensure_ascii=False))
    return path
