"""``moslim sft train`` and ``moslim rm train`` under ``torchrun --nproc_per_node=2`` with
parallel.pp=2 (gloo; one decoder layer per stage) equal the single-process runs of the same config:
final weights, last loss and — for the RM, whose calibration pass and final evaluation run through
the pipeline's forward — the Eq. 11 mapping statistics. SFT with 4 micro-batches per step (1F1B),
the RM with the default pp of them (GPipe), also on pp=2 × dp=2: each micro loss is weighted by its
share of the batch."""

import json

import pytest
import torch

from moslim_mega.config import load_config
from moslim_mega.prefs import spec_from_config
from moslim_mega.reward.trainer import train_reward_model
from moslim_mega.sft import train_sft
from moslim_mega.world.build import build_world

from .test_equivalence import REPO, torchrun
from .test_torchrun_stages import RM, SFT, _last_metrics, _max_diff, _numbers

pytestmark = pytest.mark.slow

# Two decoder layers (one per stage) and several optimizer steps (test_torchrun_stages runs one).
LAYERS = ["sft.model.num_layers=2", "rm.model.num_layers=2", "sft.epochs=1", "rm.epochs=0.5"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pp_stages")
    base = ["run.tensorboard=false", f"run.data_dir={tmp / 'data'}"]
    cfg0 = load_config(None, base + ["world.num_rm_prompts=40", "world.num_rm_eval_prompts=8", "world.num_sft=64",
                                      "world.num_policy_prompts=16"])
    paths = build_world(cfg0.world, spec_from_config(cfg0.prefs), tmp / "data")
    train_sft(load_config(None, base + SFT + LAYERS), paths["sft"], tmp / "sft_1", show_progress=False)
    train_reward_model(load_config(None, base + RM + LAYERS), tmp / "rm_1", show_progress=False)
    pp = ["parallel.pp=2"]
    jobs = [
        ["sft", "train", "--data", str(paths["sft"]), "--out", str(tmp / "sft_pp2"), *base, *SFT, *LAYERS, *pp,
         "parallel.pp_schedule=1f1b", "parallel.pp_microbatches=4"],
        ["rm", "train", "--out", str(tmp / "rm_pp2"), *base, *RM, *LAYERS, *pp, "parallel.pp_schedule=gpipe"],
    ]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    torchrun([str(REPO / "tests/parallel/run_stages.py"), str(tmp / "jobs.json")], tmp, timeout=600)
    # 2-D mesh: pp=2 × dp=2 (4 processes): each dp index pipelines its own shard of the batch.
    (tmp / "jobs4.json").write_text(json.dumps([["rm", "train", "--out", str(tmp / "rm_pp2dp2"), *base, *RM, *LAYERS,
                                                 *pp, "parallel.dp=2"]]))
    torchrun([str(REPO / "tests/parallel/run_stages.py"), str(tmp / "jobs4.json")], tmp, nproc=4, timeout=600)
    return tmp


def test_sft_under_pp2_equals_single_process(runs):
    single, par = runs / "sft_1" / "model", runs / "sft_pp2" / "model"
    assert _max_diff(single / "model.safetensors", par / "model.safetensors") < 1e-5
    m1, m2 = _last_metrics(runs / "sft_1"), _last_metrics(runs / "sft_pp2")
    assert m1["step"] == m2["step"] and abs(m1["loss"] - m2["loss"]) < 1e-5


@pytest.mark.parametrize("layout", ["pp2", "pp2dp2"])
def test_rm_train_under_pp2_equals_single_process(runs, layout):
    single, par = runs / "rm_1", runs / f"rm_{layout}"
    assert _max_diff(single / "heads.safetensors", par / "heads.safetensors") < 1e-5
    assert _max_diff(single / "backbone" / "model.safetensors", par / "backbone" / "model.safetensors") < 1e-5
    s1, s2 = (json.loads((d / "mapping_stats.json").read_text()) for d in (single, par))
    flat = lambda x: torch.tensor([v for v in _numbers(x)])  # noqa: E731
    assert torch.allclose(flat(s1), flat(s2), atol=1e-5)
    m1, m2 = _last_metrics(single), _last_metrics(par)
    assert m1["step"] == m2["step"] and abs(m1["loss"] - m2["loss"]) < 1e-5 and abs(m1["grad_norm"] - m2["grad_norm"]) < 1e-4
    e1, e2 = (json.loads((d / "eval.json").read_text())["mean"] for d in (single, par))
    assert e1.keys() == e2.keys() and all(abs(e1[k] - e2[k]) < 1e-5 for k in e1 if isinstance(e1[k], float))
