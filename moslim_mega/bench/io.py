"""Read benchmark records from a local file or folder (jsonl, json, parquet) or a hub name.

Records keep their own fields; each suite checks the fields it needs and reports the rows it
skips with their reason. A folder is read file by file in name order and every record gets a
``_file`` field (HaluEval 2.0 ships one file per domain).
"""

from __future__ import annotations

import json
from pathlib import Path

SUFFIXES = (".jsonl", ".json", ".parquet")


class BenchDataError(ValueError):
    """A benchmark source that cannot be read; the message names the file or record."""


def _read_file(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise BenchDataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BenchDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict):
            # {"data": [...]} / {"train": [...]}: one list-valued key holds the records.
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise BenchDataError(f"{path}: a JSON object must hold exactly one list of records")
            data = lists[0]
        if not isinstance(data, list):
            raise BenchDataError(f"{path}: expected a list of records, got {type(data).__name__}")
        return data
    if path.suffix == ".parquet":
        import datasets

        return [dict(r) for r in datasets.Dataset.from_parquet(str(path))]
    raise BenchDataError(f"{path}: unsupported file type (use {', '.join(SUFFIXES)})")


def load_records(src: str, split: str | None = None) -> list[dict]:
    """Every record of ``src``: a file, a folder of files, or (not a local path) a hub data set."""
    path = Path(src)
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise BenchDataError(f"{path}: no {', '.join(SUFFIXES)} files in this folder")
        rows = []
        for f in files:
            for r in _read_file(f):
                if isinstance(r, dict):
                    r = {**r, "_file": f.stem}
                rows.append(r)
        return rows
    if path.suffix in SUFFIXES or src.startswith(("/", "./", "../", "~")):
        # Clearly meant as a local path: do not send it to the hub.
        raise BenchDataError(f"{src}: not a local file or folder (no such path)")
    try:
        import datasets

        ds = datasets.load_dataset(src, split=split or None)
    except Exception as e:  # the hub's errors vary (offline, gated, missing); one clear line instead
        raise BenchDataError(f"{src!r} is not a local file or folder and could not be loaded from the hub: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if len(ds) != 1:
            raise BenchDataError(f"{src!r} has splits {', '.join(ds)}: choose one with bench.split=NAME")
        ds = next(iter(ds.values()))
    return [dict(r) for r in ds]


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
