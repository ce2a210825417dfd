"""load_records: every local form a user may have the data in, and clear errors."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from moslim_mega.data.sources import BadJSON, SourceError, load_records

REPO = Path(__file__).resolve().parents[2]
ROWS = [{"prompt": "a", "n": 1}, {"prompt": "b", "n": 2}, {"prompt": "c", "n": 3}]


def _data(rows):
    return [r.data for r in rows]


def test_jsonl_json_array_and_gzip_read_the_same_rows(tmp_path):
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")
    (tmp_path / "y.json").write_text(json.dumps(ROWS))
    with gzip.open(tmp_path / "z.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in ROWS))
    for name in ("x.jsonl", "y.json", "z.jsonl.gz"):
        assert _data(load_records(tmp_path / name)) == ROWS, name
    rows = load_records(tmp_path / "x.jsonl")
    assert [r.where for r in rows] == [f"{tmp_path / 'x.jsonl'}:{i}" for i in (1, 2, 3)]


def test_rows_are_kept_as_written_even_when_types_disagree(tmp_path):
    """Arrow would refuse this file (or turn the missing key into None); we keep each row."""
    (tmp_path / "x.jsonl").write_text('{"r": "4"}\n{"r": 4}\n{}\n{"r": [1]\n')
    rows = load_records(tmp_path / "x.jsonl")
    assert _data(rows[:3]) == [{"r": "4"}, {"r": 4}, {}]
    assert isinstance(rows[3].data, BadJSON)


def test_parquet_folder_and_saved_dataset(tmp_path):
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    assert _data(load_records(tmp_path / "p.parquet")) == ROWS
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (folder / "sub" / "b.jsonl").write_text(json.dumps(ROWS[1]) + "\n")
    (folder / "notes.txt").write_text("ignored")
    assert _data(load_records(folder)) == ROWS[:2]
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    assert _data(load_records(tmp_path / "saved")) == ROWS + ROWS[:1]
    assert _data(load_records(tmp_path / "saved", split="test")) == ROWS[:1]
    with pytest.raises(SourceError, match="no split 'dev'"):
        load_records(tmp_path / "saved", split="dev")


def test_missing_and_unsupported_sources_name_the_path(tmp_path):
    with pytest.raises(SourceError, match="not found: .*missing.jsonl"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match="unsupported file type"):
        load_records(tmp_path / "data.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no .jsonl/.json/.parquet files"):
        load_records(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("[{]")
    with pytest.raises(SourceError, match="invalid JSON array"):
        load_records(tmp_path / "bad.json")


def test_hub_name_goes_to_datasets_and_failures_name_it(tmp_path):
    """No hub here: offline, the hub path must fail fast with an error naming the data set."""
    code = (
        "from moslim_mega.data.sources import load_records, SourceError\n"
        "try:\n    load_records('openbmb/UltraSafety')\n"
        "except SourceError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO),
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "cannot load hub data set 'openbmb/UltraSafety'" in proc.stdout, proc.stderr
