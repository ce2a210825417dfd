"""Metrics sinks: one JSON object per line in ``metrics.jsonl`` and, optionally, TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = float(v)
    return out


class MetricsWriter:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, metrics: dict, tag: str = "train") -> None:
        flat = _flatten(metrics)
        row = {"step": step, "tag": tag, **{k: (None if math.isnan(v) else v) for k, v in flat.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in flat.items():
                if not math.isnan(v):
                    self._tb.add_scalar(f"{tag}/{k}", v, step)

    def offset(self) -> int:
        """Bytes written to metrics.jsonl so far (a checkpoint records it)."""
        self._file.flush()
        return self._file.tell()

    def truncate(self, offset: int) -> bool:
        """Cut metrics.jsonl back to ``offset`` bytes (resume: drop rows of the lost steps); False
        (file left alone) if it is shorter than that. TensorBoard events are not cut back."""
        self._file.flush()
        if offset > self._file.seek(0, 2):
            return False
        self._file.truncate(offset)
        self._file.seek(0, 2)
        return True

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
