"""Interrupted-and-resumed equals uninterrupted, bitwise on CPU fp32.

The interrupted run is the real CLI in a subprocess, SIGKILLed at a fault-injection point (after a
step, or inside a checkpoint write between the shards and the rename); the resumed run then
restarts with the default ``checkpoint.resume=auto`` and must reproduce every metrics row and
every final weight of a run that was never interrupted."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from moslim_mega.cli import main as cli_main
from moslim_mega.checkpoint.manager import is_complete

from ckpt_helpers import cli_args, metric_rows, run_cli_until_killed

# stage, extra overrides, fault point, checkpoint the resume must start from, weights to compare
CASES = {
    "sft": ("sft", ["checkpoint.every=3"], "after_step:5", "step_3", "model/model.safetensors"),
    "rm": ("rm", ["checkpoint.every=3"], "after_step:5", "step_3", "rm/backbone/model.safetensors"),
    "rloo": ("policy", ["policy.algo=rloo", "checkpoint.every=2"], "after_step:3", "step_2", "policy/model.safetensors"),
    "ppo": ("policy", ["policy.algo=ppo", "checkpoint.every=2"], "after_step:3", "step_2", "policy/model.safetensors"),
    "online_dpo": ("policy", ["policy.algo=online_dpo", "checkpoint.every=2"], "after_step:3", "step_2",
                   "policy/model.safetensors"),
    "rloo_in_save": ("policy", ["policy.algo=rloo", "checkpoint.every=2"], "in_save:4", "step_2",
                     "policy/model.safetensors"),
}


def _weights(run_dir, rel):
    # The RM's weights live in backbone/ and heads.safetensors.
    rel = rel.replace("rm/", "")
    out = load_file(run_dir / rel)
    if (run_dir / "heads.safetensors").is_file():
        out.update({f"heads.{k}": v for k, v in load_file(run_dir / "heads.safetensors").items()})
    return out


def _cli(argv):
    threads = torch.get_num_threads()
    try:
        assert cli_main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # run.num_threads=1 for bitwise runs; restore for other tests


@pytest.fixture(scope="module")
def uninterrupted(stage, tmp_path_factory):
    """The same CLI commands, never interrupted (one per stage kind; checkpoints on, as resumed runs have)."""
    runs = {}

    def get(name):
        if name not in runs:
            kind, extra, *_ = CASES[name]
            out = tmp_path_factory.mktemp(f"full_{name}")
            _cli(cli_args(kind, out, stage, *extra))
            runs[name] = out
        return runs[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_killed_and_resumed_run_equals_uninterrupted(name, stage, uninterrupted, tmp_path):
    kind, extra, fault, resume_from, weights = CASES[name]
    full = uninterrupted(name if name != "rloo_in_save" else "rloo")
    out = tmp_path / "run"
    argv = cli_args(kind, out, stage, *extra)
    run_cli_until_killed(argv, fault, tmp_path / "fault.marker")

    ckpt = out / "ckpt"
    assert (ckpt / "latest").read_text().strip() == resume_from
    assert is_complete(ckpt / resume_from)
    if fault.startswith("in_save"):
        # Killed between writing the shards and the rename: a full but unrenamed directory that
        # nothing may read, next to the previous (complete) checkpoint that `latest` still names.
        tmp_dir = ckpt / f"step_{fault.split(':')[1]}.tmp"
        assert tmp_dir.is_dir() and (tmp_dir / ".metadata").is_file()
        assert not (ckpt / f"step_{fault.split(':')[1]}").exists()
    killed_rows = metric_rows(out)
    assert killed_rows and killed_rows != metric_rows(full)  # it really stopped early

    _cli(argv)  # checkpoint.resume=auto (the default)

    assert metric_rows(out) == metric_rows(full)
    a, b = _weights(full, weights), _weights(out, weights)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if kind == "rm":
        assert json.loads((out / "mapping_stats.json").read_text()) == json.loads((full / "mapping_stats.json").read_text())
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(p.name for p in (full / "ckpt").iterdir())


@pytest.mark.slow
def test_resume_never_starts_over_and_an_explicit_path_resumes_from_there(stage, uninterrupted, tmp_path):
    full = uninterrupted("sft")
    out = tmp_path / "run"
    shutil.copytree(full / "ckpt", out / "ckpt")  # a previous run's checkpoints (step_3, step_6)
    kind, extra, *_ = CASES["sft"]
    _cli(cli_args(kind, out, stage, *extra, "checkpoint.resume=never"))
    assert metric_rows(out) == metric_rows(full)  # trained from step 0, same result

    out2 = tmp_path / "run2"
    _cli(cli_args(kind, out2, stage, *extra, f"checkpoint.resume={full / 'ckpt' / 'step_6'}"))
    rows = metric_rows(out2)
    # Started at step 6: no step-0 training row (metrics.jsonl is the new run's own), same final.
    assert [r for r in rows if r["tag"] == "train"] == []
    assert rows[-1] == metric_rows(full)[-1]
