"""Exact resume under pipeline parallelism (``torchrun --nproc_per_node=2``, gloo, parallel.pp=2):
``moslim sft train`` cut into two stages (one decoder layer each) is SIGKILLed after step 3 (every
process by pid, as test_resume_torchrun.py), restarted with ``resume=auto`` from its step-2
checkpoint (each pp rank saved its own stage's keys), and must reproduce every metrics row and the
final weights of an uninterrupted pp=2 run bitwise; that checkpoint then exports (``moslim export
hf``, one process) to the same weights, whose HF logits equal the trainer's saved model's."""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moslim_mega.checkpoint.export import export_hf

from ckpt_helpers import cli_args, metric_rows
from test_resume_torchrun import _torchrun

pytestmark = pytest.mark.slow

# 8 steps (2 epochs of 4 batches of 16 pairs), checkpoints every 2 steps (step_8: the final
# weights); 2 decoder layers, so each pp rank holds one.
PP = ["sft.model.num_layers=2", "checkpoint.every=2", "parallel.pp=2",
      "parallel.pp_schedule=1f1b"]


def test_killed_pp2_sft_resumes_bitwise_and_exports(stage, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _torchrun(cli_args("sft", full, stage, *PP), tmp_path)
    marker = tmp_path / "killed"
    _torchrun(cli_args("sft", resumed, stage, *PP), tmp_path,
              env_extra={"MOSLIM_FAULT": "after_step:3", "MOSLIM_FAULT_MARKER": str(marker)}, kill_when=marker)
    assert (resumed / "ckpt" / "step_2").is_dir() and not (resumed / "model").exists()
    _torchrun(cli_args("sft", resumed, stage, *PP), tmp_path)  # checkpoint.resume=auto (default)

    rows = metric_rows(resumed)
    assert rows == metric_rows(full) and len(rows) > 1
    a, b = (load_file(d / "model" / "model.safetensors") for d in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Both pp ranks wrote their stage's shard of the last checkpoint; export joins them in one process.
    last = sorted((resumed / "ckpt").glob("step_*"), key=lambda p: int(p.name[5:]))[-1]
    assert len(list(last.glob("*.distcp"))) == 2
    files = {i.fqn: info.relative_path for i, info in dcp.FileSystemReader(str(last)).read_metadata().storage_data.items()}
    q = "model_model.model.layers.{}.self_attn.q_proj.weight"
    assert files[q.format(0)] != files[q.format(1)]  # each stage's layer in its own rank's file: a real split
    export_hf(last, tmp_path / "hf", None)
    c = load_file(tmp_path / "hf" / "model.safetensors")
    assert c.keys() == b.keys() and all(torch.equal(b[k], c[k]) for k in b)
    # ... and the exported HF model computes the trainer's saved model's logits.
    ids = torch.tensor([[5, 9, 2, 7, 11, 3]])
    logits = [AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits for d in (resumed / "model", tmp_path / "hf")]
    assert torch.equal(*logits)
