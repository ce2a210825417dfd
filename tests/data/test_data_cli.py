"""`moslim data build-rm` / `build-prompts` end to end, and an RM trained on build-rm output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datafixtures import write_hh_rlhf, write_ultrafeedback, write_ultrasafety

from moslim_mega.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_build_rm_cli_then_rm_train_consumes_it(tmp_path):
    uf, us = tmp_path / "uf.jsonl", tmp_path / "UltraSafety.json"
    write_ultrafeedback(uf, num_generated=30)
    write_ultrasafety(us, num_generated=10)
    data = tmp_path / "rmdata"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "moslim_mega.cli", "data", "build-rm", "--ultrafeedback", str(uf),
         "--ultrasafety", str(us), "--datatype", "2", "--out", str(data), "--val-fraction", "0.2"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "validation" in proc.stdout and "train with: moslim rm train" in proc.stdout
    stats = json.loads((data / "stats.json").read_text())
    run = tmp_path / "rm"
    args = ["rm", "train", "--out", str(run), f"run.data_dir={data}", "prefs.datatype=2",
            "rm.model.hidden_size=32", "rm.model.intermediate_size=64", "rm.model.num_layers=1",
            "rm.batch_size=16", "rm.epochs=0.5", "rm.warmup_steps=1", "rm.eval_every=0", "run.tensorboard=false"]
    assert main(args) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["steps"] >= 3
    val = stats["splits"]["validation"]
    for head, hist in val["histograms"].items():
        # the trainer evaluated exactly the build's labelled validation examples of every head
        assert report["heads"][head]["num_labelled"] == sum(hist["classes"]) == val["records"] - hist["masked"]
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert losses and all(loss == loss for loss in losses)  # finite (NaN != NaN)


def test_build_prompts_cli_and_clear_errors(tmp_path, capsys):
    hh = tmp_path / "train.jsonl"
    exp = write_hh_rlhf(hh, num_generated=12)
    out = tmp_path / "prompts"
    assert main(["data", "build-prompts", "--hh-rlhf", str(hh), "--n", "5", "--seed", "3", "--out", str(out)]) == 0
    assert "wrote 5 prompts" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "policy_train.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(r["prompt"].endswith("\n\nAssistant:") for r in rows)
    assert len(exp["prompts"]) > 5
    assert main(["data", "build-rm", "--ultrafeedback", str(tmp_path / "missing.jsonl"), "--datatype", "4",
                 "--out", str(tmp_path / "x")]) == 2
    assert "data source not found" in capsys.readouterr().err
