"""Read benchmark records from a local file or folder (jsonl, json, parquet) or a hub name.

Records keep their own fields; each suite checks the fields it needs and reports the rows it
skips with their reason. A folder is read file by file in name order and every record gets a
``_file`` field (HaluEval 2.0 ships one file per domain).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..data.sources import BadJSON, SourceError, iter_records


class BenchDataError(ValueError):
    """A benchmark source that cannot be read; the message names the file or record."""


def load_records(src: str, split: str | None = None) -> list[dict]:
    """Every record of ``src`` (read by :func:`moslim_mega.data.sources.iter_records`). Unlike the
    data builders, which drop and report a bad row, a benchmark refuses a file with one: its
    scores would silently cover fewer items than the benchmark has."""
    folder = Path(src).expanduser().is_dir()
    records = []
    try:
        for row in iter_records(src, split):
            if isinstance(row.data, BadJSON):
                raise BenchDataError(f"{row.where}: not valid JSON ({row.data.message})")
            rec = row.data
            if folder and row.file is not None and isinstance(rec, dict):
                # HaluEval 2.0 ships one file per domain: the record keeps its file's name.
                rec = {**rec, "_file": Path(row.file.name.removesuffix(".gz")).stem}
            records.append(rec)
    except SourceError as e:
        raise BenchDataError(str(e)) from None
    return records


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
