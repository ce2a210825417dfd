"""Exact resume under pipeline parallelism (``torchrun --nproc_per_node=2``, gloo, parallel.pp=2):
``moslim sft train`` / ``moslim rm train`` cut into two stages (one decoder layer each) are
SIGKILLed after step 3 (every process by pid, as test_resume_torchrun.py), restarted with
``resume=auto`` from their step-2 checkpoint (each pp rank saved its own stage's keys), and must
reproduce every metrics row (the RM's evaluations through the pipeline's forward included) and the
final weights of an uninterrupted pp=2 run bitwise; the last checkpoint then exports (``moslim
export hf``, one process) to the same weights — for SFT, with the trainer's saved model's logits."""

import json

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moslim_mega.checkpoint.export import export_hf

from ckpt_helpers import cli_args, metric_rows
from test_resume_torchrun import _torchrun

pytestmark = pytest.mark.slow

# 8 steps each (2 epochs of 4 batches of 16), checkpoints every 2 steps (step_8: the final weights);
# 2 decoder layers, so each pp rank holds one.
PP = ["sft.model.num_layers=2", "rm.model.num_layers=2", "checkpoint.every=2", "parallel.pp=2"]
CASES = {  # kind, schedule, saved weights (the export's: without "model/"), their checkpoint key prefix
    "sft": ("sft", "1f1b", ["model/model.safetensors"], "model_model.model"),
    "rm": ("rm", "gpipe", ["backbone/model.safetensors", "heads.safetensors"], "model_rm.backbone"),
}


def _weights(run_dir, files) -> dict:
    return {f"{i}:{k}": v for i, f in enumerate(files) for k, v in load_file(run_dir / f).items()}


@pytest.mark.parametrize("name", list(CASES))
def test_killed_pp2_run_resumes_bitwise_and_exports(name, stage, tmp_path):
    kind, schedule, files, key = CASES[name]
    argv = lambda out: cli_args(kind, out, stage, *PP, f"parallel.pp_schedule={schedule}")  # noqa: E731
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    _torchrun(argv(full), tmp_path)
    marker = tmp_path / "killed"
    _torchrun(argv(resumed), tmp_path, env_extra={"MOSLIM_FAULT": "after_step:3", "MOSLIM_FAULT_MARKER": str(marker)},
              kill_when=marker)
    assert (resumed / "ckpt" / "step_2").is_dir() and not (resumed / files[0]).exists()
    _torchrun(argv(resumed), tmp_path)  # checkpoint.resume=auto (default)

    rows = metric_rows(resumed)
    assert rows == metric_rows(full) and len(rows) > 1
    a, b = _weights(full, files), _weights(resumed, files)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if kind == "rm":
        assert json.loads((resumed / "mapping_stats.json").read_text()) == json.loads((full / "mapping_stats.json").read_text())

    # Both pp ranks wrote their stage's shard of the last checkpoint: each layer in its rank's file.
    last = resumed / "ckpt" / "step_8"
    assert len(list(last.glob("*.distcp"))) == 2
    where = {i.fqn: info.relative_path for i, info in dcp.FileSystemReader(str(last)).read_metadata().storage_data.items()}
    q = key + ".layers.{}.self_attn.q_proj.weight"
    assert where[q.format(0)] != where[q.format(1)]
    # Export joins them in one process, to the trainer's final weights.
    export_hf(last, tmp_path / "hf", None)
    c = _weights(tmp_path / "hf", [f.removeprefix("model/") for f in files])
    assert c.keys() == b.keys() and all(torch.equal(b[k], c[k]) for k in b)
    if kind == "sft":  # ... and the exported HF model computes the trainer's saved model's logits
        ids = torch.tensor([[5, 9, 2, 7, 11, 3]])
        logits = [AutoModelForCausalLM.from_pretrained(d).eval()(ids).logits for d in (resumed / "model", tmp_path / "hf")]
        assert torch.equal(*logits)
