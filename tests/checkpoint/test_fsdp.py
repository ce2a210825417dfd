"""A 2-process gloo FSDP2 checkpoint: sharded save, exact sharded reload, and HF export of the
shards in one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moslim_mega.checkpoint.export import export_hf

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_fsdp2_sharded_checkpoint_reloads_exactly_and_exports_to_hf(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__).parent / "fsdp_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (tmp_path / "ok_rank0").is_file() and (tmp_path / "ok_rank1").is_file()

    step_dir = tmp_path / "ckpt" / "step_1"
    assert sorted(p.name for p in step_dir.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one per rank
    assert (step_dir / "extra_rank0.json").is_file() and (step_dir / "extra_rank1.json").is_file()

    summary = export_hf(tmp_path / "ckpt", tmp_path / "hf")  # one process, no process group
    assert summary["model"] == "actor" and summary["step"] == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids_BT = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids_BT).logits
    sharded = torch.load(tmp_path / "logits.pt")
    assert (logits - sharded).abs().max().item() <= 1e-5
