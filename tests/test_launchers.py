"""launchers/torchrun.sh picks its Python without an activated shell: MOSLIM_PYTHON, else the
active virtualenv, else the project's .venv, else python3 on PATH; it names the one it uses and
stops with one clear line when that interpreter has no torch. Fake interpreters (shell scripts
that print their arguments) stand in for Python, so nothing is launched."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE = """#!/bin/sh
# the launcher's torch probe is `python -c ...`: exit 1 there plays an interpreter without torch
if [ "$1" = -c ]; then exit {no_torch}; fi
echo "{name} $*"
"""


def _fake_python(path: Path, name: str, torch: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FAKE.format(name=name, no_torch=0 if torch else 1))
    path.chmod(0o755)
    return path


def _launch(tree: Path, **env) -> subprocess.CompletedProcess:
    fresh = {"HOME": str(tree), "PATH": "/usr/bin:/bin", **env}  # a new terminal: nothing activated
    return subprocess.run(["launchers/torchrun.sh", "2", "rm", "train", "--out", "runs/x"], cwd=tree,
                          env=fresh, capture_output=True, text=True, timeout=60)


def test_torchrun_launcher_finds_the_project_venv(tmp_path):
    tree = tmp_path / "repo"
    (tree / "launchers").mkdir(parents=True)
    shutil.copy2(ROOT / "launchers" / "torchrun.sh", tree / "launchers" / "torchrun.sh")
    venv_py = _fake_python(tree / ".venv" / "bin" / "python", "VENV")

    proc = _launch(tree)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ("VENV -m torch.distributed.run --standalone --nproc_per_node=2 "
                                   "-m moslim_mega.cli rm train --out runs/x")
    assert f"python {venv_py} (from the project's .venv" in proc.stderr

    active = _fake_python(tmp_path / "other" / "bin" / "python", "ACTIVE")
    proc = _launch(tree, VIRTUAL_ENV=str(active.parent.parent))
    assert proc.stdout.startswith("ACTIVE -m torch.distributed.run") and "the active virtualenv" in proc.stderr

    chosen = _fake_python(tmp_path / "chosen" / "python", "CHOSEN")
    proc = _launch(tree, MOSLIM_PYTHON=str(chosen), VIRTUAL_ENV=str(active.parent.parent))
    assert proc.stdout.startswith("CHOSEN -m torch.distributed.run") and "from MOSLIM_PYTHON" in proc.stderr


def test_torchrun_launcher_refuses_a_python_without_torch(tmp_path):
    tree = tmp_path / "repo"
    (tree / "launchers").mkdir(parents=True)
    shutil.copy2(ROOT / "launchers" / "torchrun.sh", tree / "launchers" / "torchrun.sh")
    _fake_python(tree / ".venv" / "bin" / "python", "VENV", torch=False)
    proc = _launch(tree)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "cannot import torch: run `make install`" in proc.stderr and "MOSLIM_PYTHON" in proc.stderr
