"""``moslim sft train`` with ``parallel.backend=megatron`` under virtual pipeline stages and full
recomputation: 2 gloo processes on CPU through the real CLI (run_cli_shim.py, as
test_trainers_gloo.py), a 4-layer tiny Llama (pp=2 × 2 stages per rank: one layer per chunk).

* ``parallel.pp=2 parallel.pp_schedule=interleaved_1f1b parallel.pp_stages_per_rank=2``, with and
  without ``parallel.activation_checkpointing=true``, equals the plain 1F1B megatron run at pp=2
  (every final tensor within 1e-6; measured 1.2e-7) and the torch backend's single-process run
  (metrics rows within test_trainers_gloo's TOL; tensors within 5e-5: after 4 AdamW steps on this
  4-layer model the plain pp=2 run differs from torch by the same 3.8e-5, on one MLP weight of
  layer 3 — Adam's m/(√v+ε) magnifying last-bit differences of near-zero gradients, as in
  test_engine_gloo.py's PARAM_TOL);
* its megatron checkpoint (one sharded state dict per chunk, "model0"/"model1") resumes: a run
  started from its step-2 checkpoint ends with the same weights and rows bit for bit, and
  ``moslim export hf`` of the last checkpoint gives the final weights bit for bit;
* ``parallel.pp_schedule=gpipe`` is refused naming the field (megatron schedules 1F1B only)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from .cpu_shim import require_pinned
from .test_trainers_gloo import MG, TOL, _launch, _row_diff, _rows, _sft, _weights

pytestmark = pytest.mark.slow

L4 = ["sft.model.num_layers=4"]
WEIGHT_TOL = 5e-5  # vs torch (see above); vs the plain 1F1B megatron run: 1e-6
VPP = ["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_stages_per_rank=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    require_pinned()
    from moslim_mega.config import load_config
    from moslim_mega.prefs import spec_from_config
    from moslim_mega.sft import train_sft
    from moslim_mega.world.build import build_world

    tmp = tmp_path_factory.mktemp("megatron_vpp_trainers")
    world = load_config(None, ["world.num_sft=32", "world.num_rm_prompts=4", "world.num_rm_eval_prompts=4",
                               "world.num_policy_prompts=4"]).world
    paths = build_world(world, spec_from_config(load_config(None, []).prefs), tmp / "data")
    threads = torch.get_num_threads()
    try:  # the torch backend, one process, in this process
        train_sft(load_config(None, _sft(tmp, "sft_torch", *L4)[6:]), paths["sft"], tmp / "sft_torch",
                  show_progress=False)
    finally:
        torch.set_num_threads(threads)
    _launch([
        _sft(tmp, "sft_pp2", *MG, *L4, "parallel.pp=2"),
        _sft(tmp, "sft_vpp", *MG, *L4, *VPP, "checkpoint.every=2"),
        _sft(tmp, "sft_vpp_from2", *MG, *L4, *VPP, f"checkpoint.resume={tmp / 'sft_vpp' / 'ckpt' / 'step_2'}"),
        _sft(tmp, "sft_vpp_recompute", *MG, *L4, *VPP, "parallel.activation_checkpointing=true"),
        {"argv": _sft(tmp, "sft_gpipe", *MG, *L4, "parallel.pp=2", "parallel.pp_schedule=gpipe"), "rc": 2},
    ], tmp, "main")
    return tmp


@pytest.mark.parametrize("run", ["sft_vpp", "sft_vpp_recompute"])
def test_interleaved_megatron_run_equals_the_torch_backend(runs, run):
    ref, got = _weights(runs / "sft_torch", "sft"), _weights(runs / run, "sft")
    assert ref.keys() == got.keys()
    init = {f"model/model.safetensors:{k}": v for k, v in load_file(runs / run / "megatron_init" / "model.safetensors").items()}
    assert max(float((ref[k] - init[k]).abs().max()) for k in ref) > 1e-3  # training changed the weights
    assert max(float((ref[k] - got[k]).abs().max()) for k in ref) < WEIGHT_TOL
    plain = _weights(runs / "sft_pp2", "sft")
    assert max(float((plain[k] - got[k]).abs().max()) for k in ref) < 1e-6
    assert _row_diff(_rows(runs / "sft_torch"), _rows(runs / run)) < TOL


def test_interleaved_checkpoint_resumes_exactly(runs):
    full, other = runs / "sft_vpp", runs / "sft_vpp_from2"
    a, b = _weights(full, "sft"), _weights(other, "sft")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(other) == [r for r in _rows(full) if r["step"] >= 2]
    layout = json.loads((full / "ckpt" / "step_4" / "engine" / "model" / "moslim_layout.json").read_text())
    assert (layout["pp"], layout["vpp"]) == (2, 2)


def test_export_hf_of_an_interleaved_checkpoint_gives_the_final_weights(runs, tmp_path):
    from moslim_mega.checkpoint.export import export_hf

    export_hf(runs / "sft_vpp" / "ckpt" / "step_4", tmp_path / "hf")
    a = _weights(runs / "sft_vpp", "sft")
    b = {f"model/model.safetensors:{k}": v for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gpipe_is_refused_under_the_megatron_backend(runs):
    log = (runs / "main.log").read_text()
    assert "moslim: error: parallel.pp_schedule=gpipe: the megatron backend runs 1f1b or interleaved_1f1b only" in log
