"""CheckpointManager on a small module: atomic layout, retention, resume choice, exact restore."""

import json
import random
from dataclasses import replace

import numpy as np
import pytest
import torch

from moslim_mega.checkpoint.manager import CheckpointError, CheckpointManager, is_complete, resolve_checkpoint
from moslim_mega.config import CheckpointConfig


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train_step(model, opt):
    loss = model(torch.randn(5, 4)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _save(mgr, steps_done, model, opt, **extra):
    return mgr.save(steps_done, {"net": model}, {"net": (model, opt)}, extra)


def test_save_is_atomic_keeps_last_n_and_points_latest_at_the_newest(tmp_path):
    mgr = CheckpointManager(CheckpointConfig(every=1, keep_last=2), tmp_path)
    model, opt = _setup()
    for step in range(1, 6):
        _train_step(model, opt)
        path = _save(mgr, step, model, opt, at=step)
        assert path == tmp_path / "ckpt" / f"step_{step}" and is_complete(path)
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["latest", "step_4", "step_5"]  # no *.tmp left, two kept
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == "step_5"
    meta = json.loads((tmp_path / "ckpt" / "step_5" / "meta.json").read_text())
    assert meta["step"] == 5 and meta["world_size"] == 1 and meta["models"] == ["net"]

    all_kept = CheckpointManager(CheckpointConfig(every=1, keep_last=0), tmp_path / "b")
    for step in range(1, 4):
        _save(all_kept, step, model, opt)
    assert [p.name for p in all_kept.complete_checkpoints()] == ["step_1", "step_2", "step_3"]


def test_load_restores_model_optimizer_and_every_global_rng_exactly(tmp_path):
    mgr = CheckpointManager(CheckpointConfig(every=1), tmp_path)
    model, opt = _setup(0)
    for _ in range(3):
        _train_step(model, opt)
    _save(mgr, 3, model, opt, note="x")
    draws = (torch.rand(3), random.random(), np.random.rand())
    _train_step(model, opt)  # the uninterrupted run continues (its step draws from the global RNG)
    ref = {k: v.clone() for k, v in model.state_dict().items()}

    fresh, fresh_opt = _setup(1)  # another init, empty optimizer state
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    state = mgr.load(mgr.resume_path(), {"net": fresh}, {"net": (fresh, fresh_opt)})
    assert state == {"note": "x"}
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(again[0], draws[0]) and again[1:] == draws[1:]
    _train_step(fresh, fresh_opt)
    assert all(torch.equal(ref[k], v) for k, v in fresh.state_dict().items())
    assert int(fresh_opt.state_dict()["state"][0]["step"]) == 4


def test_resume_choice_and_crash_leftovers(tmp_path):
    model, opt = _setup()
    mgr = CheckpointManager(CheckpointConfig(every=2), tmp_path)
    assert mgr.resume_path() is None  # nothing yet: a fresh start
    _save(mgr, 2, model, opt)
    _save(mgr, 4, model, opt)
    # A save killed before its rename leaves step_6.tmp; `latest` still names step_4.
    (tmp_path / "ckpt" / "step_6.tmp").mkdir()
    (tmp_path / "ckpt" / "step_6.tmp" / "__0_0.distcp").write_bytes(b"partial")
    assert mgr.resume_path() == tmp_path / "ckpt" / "step_4"
    _save(mgr, 6, model, opt)  # the retried save replaces the leftover
    assert not (tmp_path / "ckpt" / "step_6.tmp").exists() and is_complete(tmp_path / "ckpt" / "step_6")

    assert CheckpointManager(CheckpointConfig(resume="never"), tmp_path).resume_path() is None
    explicit = CheckpointManager(CheckpointConfig(resume=str(tmp_path / "ckpt" / "step_4")), tmp_path / "other")
    assert explicit.resume_path() == tmp_path / "ckpt" / "step_4"
    assert resolve_checkpoint(tmp_path / "ckpt") == tmp_path / "ckpt" / "step_6"  # a root → its latest
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        CheckpointManager(CheckpointConfig(resume=str(tmp_path / "ckpt" / "step_6.tmp")), tmp_path).resume_path()

    (tmp_path / "ckpt" / "latest").write_text("step_8\n")  # pointer to something that is not there
    with pytest.raises(CheckpointError, match="step_8"):
        mgr.resume_path()


def test_load_refuses_another_world_size_and_other_models(tmp_path):
    model, opt = _setup()
    mgr = CheckpointManager(CheckpointConfig(every=1), tmp_path)
    path = _save(mgr, 1, model, opt)
    with pytest.raises(CheckpointError, match="optimizers"):
        mgr.load(path, {"net": model}, {})
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "world_size": 2}))
    with pytest.raises(CheckpointError, match="same world size"):
        mgr.load(path, {"net": model}, {"net": (model, opt)})


def test_relative_and_absolute_dirs_and_bad_settings(tmp_path):
    assert CheckpointManager(CheckpointConfig(dir="ck"), tmp_path / "run").root == tmp_path / "run" / "ck"
    assert CheckpointManager(CheckpointConfig(dir=str(tmp_path / "abs")), tmp_path / "run").root == tmp_path / "abs"
    with pytest.raises(CheckpointError, match="checkpoint.every"):
        CheckpointManager(replace(CheckpointConfig(), every=-1), tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint.resume"):
        CheckpointManager(replace(CheckpointConfig(), resume=""), tmp_path)
