"""Progress output fit for batch jobs: a redrawing bar only on a terminal, plain lines elsewhere."""

import io
import os
import subprocess
import sys

import pytest
from tqdm import tqdm

from moslim_mega.utils import progress as prog


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_a_tqdm_bar_and_a_pipe_gets_plain_lines(monkeypatch):
    assert isinstance(prog.progress(range(3), "x", True, stream=_Tty()), tqdm)
    monkeypatch.setenv(prog.ENV_EVERY_S, "0")  # a line after every step
    out = io.StringIO()
    bar = prog.progress(range(2, 6), "sft", True, stream=out)
    assert not isinstance(bar, tqdm)
    seen = []
    for step in bar:
        seen.append(step)
        bar.set_postfix(loss=f"{step / 10:.3f}")
    assert seen == [2, 3, 4, 5]
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 4
    assert lines[0].startswith("sft: step 3/6 (50.0%)") and lines[0].endswith("loss=0.200")
    assert lines[-1].startswith("sft: step 6/6 (100.0%)") and "eta 0:00:00" in lines[-1]


def test_plain_lines_are_throttled_but_the_last_step_is_always_printed(monkeypatch):
    monkeypatch.setenv(prog.ENV_EVERY_S, "3600")
    out = io.StringIO()
    for _ in prog.progress(range(50), "rm train", True, stream=out):
        pass
    (line,) = out.getvalue().splitlines()
    assert line.startswith("rm train: step 50/50 (100.0%)")


def test_disabled_progress_is_silent_but_write_still_reports():
    out = io.StringIO()
    bar = prog.progress(range(3), "policy rloo", False, stream=out)
    assert list(bar) == [0, 1, 2] and out.getvalue() == ""
    bar.write("policy: stopping at step 2")
    assert out.getvalue() == "policy: stopping at step 2\n"


@pytest.mark.parametrize("bad", ["soon", "-1", "nan"])
def test_bad_interval_is_named(monkeypatch, bad):
    monkeypatch.setenv(prog.ENV_EVERY_S, bad)
    with pytest.raises(ValueError, match=prog.ENV_EVERY_S):
        prog.progress(range(2), "x", True, stream=io.StringIO())


def test_a_piped_stage_writes_no_carriage_returns(tmp_path):
    """The real CLI with stderr to a pipe (as under sbatch): plain progress lines, no bar frames."""
    world = tmp_path / "world"
    env_cmd = [sys.executable, "-m", "moslim_mega.cli"]
    subprocess.run([*env_cmd, "world", "build", "--out", str(world), "world.num_sft=64", "world.num_rm_prompts=8",
                    "world.num_rm_eval_prompts=4", "world.num_policy_prompts=8"], check=True, capture_output=True)
    proc = subprocess.run(
        [*env_cmd, "sft", "train", "--data", str(world / "sft.jsonl"), "--out", str(tmp_path / "sft"),
         "sft.model.hidden_size=32", "sft.model.intermediate_size=64", "sft.model.num_layers=1",
         "sft.model.num_heads=2", "sft.epochs=1", "sft.batch_size=16", "run.tensorboard=false"],
        capture_output=True, text=True, env={**os.environ, prog.ENV_EVERY_S: "0"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stderr and "\r" not in proc.stdout
    assert "sft: step 4/4 (100.0%)" in proc.stderr, proc.stderr[-2000:]
