import json

import datasets
import pytest

from moslim_mega.bench.io import BenchDataError, load_records


def test_jsonl_json_parquet_and_folder(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "subset": "alpacaeval-easy", "id": i} for i in range(3)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "b.json").write_text(json.dumps({"data": rows[:2]}))
    datasets.Dataset.from_list(rows[:1]).to_parquet(str(tmp_path / "c.parquet"))
    assert load_records(str(tmp_path / "a.jsonl")) == rows
    assert load_records(str(tmp_path / "b.json")) == rows[:2]
    assert load_records(str(tmp_path / "c.parquet")) == rows[:1]
    folder = load_records(str(tmp_path))
    assert len(folder) == 6 and [r["_file"] for r in folder] == ["a"] * 3 + ["b"] * 2 + ["c"]


def test_bad_sources_name_the_file(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"a": [], "b": []}))
    with pytest.raises(BenchDataError, match="exactly one list"):
        load_records(str(tmp_path / "x.json"))
    (tmp_path / "y.jsonl").write_text('{"a": 1}\n[1,\n')
    with pytest.raises(BenchDataError, match="y.jsonl:2"):
        load_records(str(tmp_path / "y.jsonl"))
    with pytest.raises(BenchDataError, match="no such path"):
        load_records(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchDataError, match="no .jsonl"):
        load_records(str(tmp_path / "empty"))
