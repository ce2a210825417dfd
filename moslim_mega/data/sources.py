"""Read a public data set from wherever the user has it: a local file, a folder, a data set saved
with ``datasets.save_to_disk``, or a hub name (``owner/name``, where the machine has access).

``iter_records(src)`` streams (``load_records(src)`` lists) :class:`Row` objects: the raw row (a dict, exactly as stored) and a
``where`` string (``file:line`` or ``split[index]``) that drop reports name.

Why JSON is read with the standard library and not ``datasets``' JSON builder: Arrow infers one
schema for the whole file, so a single row whose field has the wrong type (a malformed row) aborts
the load of every valid row, and a missing key silently becomes ``None``. The data builders must
instead report each malformed row and keep the rest, so JSON rows are kept as written. Parquet,
saved Arrow data sets and hub data sets come through ``datasets`` (their schema is already fixed).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)


class SourceError(ValueError):
    """A data source that cannot be read; the message names the path or hub name."""


@dataclass(frozen=True)
class Row:
    """One raw row and where it came from (for drop reports)."""

    where: str
    data: object
    file: Path | None = None
    """The local file it was read from (None for saved and hub data sets)."""


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.lower().endswith(".gz") else open(path, encoding="utf-8")


def _records_of_object(path: Path, obj: dict) -> list:
    """``{"data": [...]}`` (a JSON file holding one object): its one list-valued key holds the records."""
    lists = [v for v in obj.values() if isinstance(v, list)]
    if len(lists) != 1:
        raise SourceError(f"{path}: a JSON object must hold exactly one list of records")
    return lists[0]


def _read_json_file(path: Path) -> Iterator[Row]:
    """A JSON array (``UltraSafety.json``), a ``.json`` object with one list of records, or JSON
    lines, streamed line by line (UltraFeedback's raw files are large); an unparseable line becomes
    a Row whose data is a :class:`BadJSON`, so the caller reports it with the rest of the drops."""
    with _open_text(path) as f:
        first = ""
        while not first:
            chunk = f.read(1)
            if not chunk or not chunk.isspace():
                first = chunk or " "
        f.seek(0)
        items = None
        if first == "[":
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise SourceError(f"{path}: invalid JSON array ({e.msg} at line {e.lineno})") from None
        elif first == "{" and path.name.lower().endswith((".json", ".json.gz")):
            try:
                items = _records_of_object(path, json.load(f))
            except json.JSONDecodeError:
                f.seek(0)  # not one document: JSON lines under a .json name
        if items is not None:
            yield from (Row(f"{path}[{i}]", item, path) for i, item in enumerate(items))
            return
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Row(f"{path}:{lineno}", json.loads(line), path)
            except json.JSONDecodeError as e:
                yield Row(f"{path}:{lineno}", BadJSON(e.msg), path)


@dataclass(frozen=True)
class BadJSON:
    """Stands in for a line that is not valid JSON."""

    message: str


def _read_datasets(obj, label: str, split: str | None) -> Iterator[Row]:
    """Rows of a ``datasets.Dataset`` or ``DatasetDict`` (all splits in order, or one)."""
    import datasets

    if isinstance(obj, datasets.DatasetDict):
        if split is not None:
            if split not in obj:
                raise SourceError(f"{label}: no split {split!r}; it has {', '.join(obj)}")
            parts = [(split, obj[split])]
        else:
            parts = list(obj.items())
    else:
        parts = [(split or "data", obj)]
    return (Row(f"{label}:{name}[{i}]", row) for name, ds in parts for i, row in enumerate(ds))


def _files_in(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and _kind(p) is not None)
    if not files:
        raise SourceError(f"{folder}: no .jsonl/.json/.parquet files (or a saved data set) in this folder")
    return files


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def iter_records(src: str | Path, split: str | None = None) -> Iterator[Row]:
    """Rows of a local file/folder, a ``save_to_disk`` folder or a hub data set, streamed.

    ``split`` picks one split of a saved ``DatasetDict`` or a hub data set (hub default:
    ``train``); files in a folder are read in sorted path order. A missing source raises
    :class:`SourceError` here, before any row is read.
    """
    src_str = str(src)
    path = Path(src_str).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        if _is_saved_dataset(path):
            import datasets

            return _read_datasets(datasets.load_from_disk(str(path)), str(path), split)
        files = _files_in(path)
        return (row for f in files for row in _read_file(f))
    if _looks_like_hub_name(src_str):
        return _read_hub(src_str, split)
    raise SourceError(f"data source not found: {src_str!r} (no such path: not a local file or folder, nor a hub name owner/name)")


def load_records(src: str | Path, split: str | None = None) -> list[Row]:
    """:func:`iter_records` as a list (small sources; the builders stream)."""
    return list(iter_records(src, split))


def _looks_like_hub_name(src: str) -> bool:
    parts = src.split("/")
    return (
        len(parts) == 2
        and all(parts)
        and not src.startswith((".", "~"))
        and _kind(Path(src)) is None
    )


def _read_hub(name: str, split: str | None) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # the hub raises many types (offline, gated, missing); name the source
        raise SourceError(f"cannot load hub data set {name!r} (split {split or 'train'!r}): {e}") from None
    return _read_datasets(ds, name, split or "train")


def _read_file(path: Path) -> Iterator[Row]:
    kind = _kind(path)
    if kind == "json":
        return _read_json_file(path)
    if kind == "parquet":
        import datasets

        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        return (Row(f"{path}[{i}]", row, path) for i, row in enumerate(ds))
    raise SourceError(f"{path}: unsupported file type (expected {', '.join(JSON_SUFFIXES + PARQUET_SUFFIXES)})")
