"""megatron-core stays behind its wall: only engine/megatron imports it, lazily, and the package
(HF → Megatron conversion included) works where it is not installed."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_only_engine_megatron_imports_megatron():
    offenders = []
    for path in (ROOT / "moslim_mega").rglob("*.py"):
        text = path.read_text()
        if re.search(r"^\s*(from|import)\s+megatron\b", text, re.M) and "engine/megatron" not in path.as_posix():
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


NO_MEGATRON = """
import sys
sys.modules["megatron"] = None  # as if megatron-core were not installed
from pathlib import Path
sys.path.insert(0, {tests!r})
from engine.megatron.tiny_hf import save_causal_lm
import moslim_mega.cli
from moslim_mega.engine.megatron import MegatronNotInstalled
from moslim_mega.engine.megatron.convert import hf_to_megatron, megatron_to_hf
out = Path({out!r})
hf_to_megatron(save_causal_lm("qwen2", out / "hf"), out / "mg")  # writing needs only torch
try:
    megatron_to_hf(out / "mg", out / "back")
except MegatronNotInstalled as e:
    print("REFUSED", e)
"""


def test_the_package_works_without_megatron_core(tmp_path):
    code = NO_MEGATRON.format(tests=str(ROOT / "tests"), out=str(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED megatron-core is not installed" in proc.stdout and "pip install -e '.[megatron]'" in proc.stdout
    assert (tmp_path / "mg/release/metadata.json").is_file()
