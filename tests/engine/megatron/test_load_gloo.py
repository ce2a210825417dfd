"""megatron-core reads the converted checkpoints: 2 gloo processes, tp=2 / pp=2 (+ vpp=2) / ep=2.

One conversion per model (written for tp=2, pp=2) is loaded under several layouts by megatron's
own ``GPTModel.sharded_state_dict()`` + ``dist_checkpointing.load`` in strict mode, and each rank's
parameters equal the HF tensors mapped for that rank (``load_worker.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from moslim_mega.engine.megatron.convert import hf_to_megatron  # noqa: E402
from moslim_mega.engine.megatron.dims import Layout  # noqa: E402

from .tiny_hf import save_causal_lm, save_reward_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]

# (case name, source, tied, load layout)
CASES = [
    ("llama_tp2", "llama", False, {"tp": 2}),
    ("llama_tied_pp2", "llama", True, {"pp": 2}),
    ("llama_tied_pp2_vpp2", "llama", True, {"pp": 2, "vpp": 2}),
    ("qwen2_tied_tp2", "qwen2", True, {"tp": 2}),
    ("qwen2_pp2", "qwen2", False, {"pp": 2}),
    ("moe_ep2", "qwen2_moe", False, {"ep": 2}),
    ("moe_tp2", "qwen2_moe", False, {"tp": 2}),
    ("moe_pp2", "qwen2_moe", False, {"pp": 2}),
    ("moe_pp2_vpp2", "qwen2_moe", False, {"pp": 2, "vpp": 2}),
    ("rm_qwen2_pp2", "rm", False, {"pp": 2}),
]


def test_megatron_core_loads_the_converted_checkpoints(tmp_path):
    cases, converted = [], set()
    for name, arch, tied, layout in CASES:
        hf, ckpt = f"{arch}_{tied}_hf", tmp_path / f"{arch}_{tied}_mg"
        if (arch, tied) not in converted:
            if arch == "rm":
                save_reward_model("qwen2", tmp_path / hf)
            else:
                save_causal_lm(arch, tmp_path / hf, tied=tied)
            hf_to_megatron(tmp_path / hf, ckpt, Layout(tp=2, pp=2, ep=2 if arch == "qwen2_moe" else 1))
            converted.add((arch, tied))
        cases.append({"name": name, "hf": hf, "ckpt": str(ckpt), "layout": layout})
    cases_file = tmp_path / "cases.json"
    cases_file.write_text(json.dumps(cases))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "load_worker.py"), str(cases_file)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for name, *_ in CASES:
        for rank in (0, 1):
            assert int((tmp_path / f"ok_{name}_rank{rank}").read_text()) > 0, (name, rank)
