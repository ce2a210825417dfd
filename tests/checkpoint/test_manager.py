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


# ---- nothing in a checkpoint is unpickled beyond plain data -----------------------------------
class _Payload:
    """Unpickling this creates the directory ``path``: the proof that a load ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        import os

        return os.mkdir, (self.path,)


def _saved(tmp_path):
    model, opt = _setup()
    _train_step(model, opt)
    mgr = CheckpointManager(CheckpointConfig(every=1), tmp_path)
    return mgr, _save(mgr, 1, model, opt, note="x"), model, opt


def test_a_loop_state_file_carrying_a_pickle_is_refused_without_running_it(tmp_path):
    import pickle

    mgr, path, model, opt = _saved(tmp_path)
    ran = tmp_path / "payload_ran"
    (path / "extra_rank0.json").write_bytes(pickle.dumps({"note": _Payload(ran)}))
    with pytest.raises(CheckpointError, match=r"extra_rank0.json: not a JSON loop-state file"):
        mgr.load(path, {"net": model}, {"net": (model, opt)})
    assert not ran.exists()
    (path / "extra_rank0.json").write_text('{"note": {"__pickle__": "x"}}')
    with pytest.raises(CheckpointError, match="unknown tagged value"):
        mgr.load(path, {"net": model}, {"net": (model, opt)})


def test_an_old_pickled_checkpoint_is_refused_without_running_it(tmp_path):
    mgr, path, model, opt = _saved(tmp_path)
    ran = tmp_path / "payload_ran"
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    torch.save({"note": _Payload(ran), "_global_rng": {}}, path / "extra_rank0.pt")  # format 1's file
    with pytest.raises(CheckpointError, match="format_version 1.*pickle"):
        mgr.load(path, {"net": model}, {"net": (model, opt)})
    assert not ran.exists()


def test_dcp_metadata_and_values_carrying_code_are_refused(tmp_path):
    import pickle

    from moslim_mega.checkpoint.export import load_model_tensors

    mgr, path, model, opt = _saved(tmp_path)
    ran = tmp_path / "payload_ran"
    good = (path / ".metadata").read_bytes()
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(ran)))
    with pytest.raises(CheckpointError, match=r"\.metadata: refers to posix\.mkdir"):
        mgr.load(path, {"net": model}, {"net": (model, opt)})
    with pytest.raises(CheckpointError, match=r"\.metadata: refers to posix\.mkdir"):
        load_model_tensors(path, "model_net")  # what `moslim export hf` reads
    assert not ran.exists()
    (path / ".metadata").write_bytes(good)

    # A non-tensor optimizer value is saved as a pickle by DCP: a hostile one must not load.
    evil_model, evil_opt = _setup()
    evil_opt.param_groups[0]["note"] = _Payload(ran)
    evil = _save(CheckpointManager(CheckpointConfig(every=1), tmp_path / "evil"), 1, evil_model, evil_opt)
    fresh, fresh_opt = _setup()
    fresh_opt.param_groups[0]["note"] = None  # the same keys, so DCP asks for that value
    with pytest.raises(CheckpointError, match="param_groups.0.note.*not plain data.*posix.mkdir"):
        mgr.load(evil, {"net": fresh}, {"net": (fresh, fresh_opt)})
    assert not ran.exists()


# ---- a crash at any moment of a re-save leaves `latest` naming a complete checkpoint -----------
class _Crash(BaseException):
    """Stands for a SIGKILL: nothing after it runs (not even `except Exception` handlers)."""


def _crash_after(monkeypatch, root, n: int) -> list:
    """Make the n-th rename/replace/rmtree of an entry of ``root`` (a checkpoint directory or the
    pointer; DCP's own renames inside a directory being written do not count) "kill" the
    process right after it ran."""
    import os
    import shutil
    from pathlib import Path

    done = []

    def wrap(fn):
        def op(*args, **kwargs):
            out = fn(*args, **kwargs)
            if Path(args[0]).parent != root:
                return out
            done.append(f"{fn.__name__}({Path(args[0]).name})")
            if len(done) == n:
                raise _Crash(f"killed after {fn.__name__}{args}")
            return out
        return op

    for mod, name in ((os, "rename"), (os, "replace"), (shutil, "rmtree")):
        monkeypatch.setattr(mod, name, wrap(getattr(mod, name)))
    return done


def test_resaving_the_step_latest_names_survives_a_kill_after_every_file_operation(tmp_path, monkeypatch):
    """Resumed from step_2 while `latest` names step_4, the run saves step_4 again: killed after
    any single rename/replace/delete of that save, `resume=auto` loads a complete checkpoint,
    either the old step_4 or the new one."""
    import shutil

    model, opt = _setup(0)
    base = tmp_path / "base"
    mgr = CheckpointManager(CheckpointConfig(every=2, keep_last=0), base)
    _save(mgr, 2, model, opt)
    _train_step(model, opt)
    _save(mgr, 4, model, opt, timeline="old")
    old = {k: v.clone() for k, v in model.state_dict().items()}
    _train_step(model, opt)  # the resumed timeline reaches step 4 with other weights
    new = {k: v.clone() for k, v in model.state_dict().items()}
    outcomes = []
    for n in range(1, 50):
        root = tmp_path / f"kill_{n}"
        shutil.copytree(base, root)
        done = _crash_after(monkeypatch, root / "ckpt", n)
        run = CheckpointManager(CheckpointConfig(every=2, keep_last=0), root)
        try:
            _save(run, 4, model, opt, timeline="new")
            finished = True
        except _Crash:
            finished = False
        monkeypatch.undo()
        resumed = CheckpointManager(CheckpointConfig(every=2), root).resume_path()  # resume=auto
        assert resumed is not None and is_complete(resumed), (n, done)
        fresh, fresh_opt = _setup(1)
        state = CheckpointManager(CheckpointConfig(every=2), root).load(resumed, {"net": fresh}, {"net": (fresh, fresh_opt)})
        want = new if state["timeline"] == "new" else old
        assert all(torch.equal(want[k], v) for k, v in fresh.state_dict().items()), (n, done)
        outcomes.append((done[-1] if done else None, state["timeline"], resumed.name))
        if finished:
            break
    assert finished and outcomes[-1][1] == "new" and len(outcomes) >= 4, outcomes
    assert sorted(p.name for p in (root / "ckpt").iterdir()) == ["latest", "step_2", "step_4"]  # no leftovers


class _SelfSaving:
    """A model item that writes its own format (as the megatron engine's MegatronCheckpoint does):
    the manager hands it ``ckpt/step_N/engine/<name>`` instead of putting it into DCP."""

    def __init__(self, value: float):
        self.value = value

    def save_checkpoint(self, path):
        path.mkdir(parents=True)
        (path / "state.json").write_text(json.dumps(self.value))
        # What megatron's torch_dist writer leaves: a DCP .metadata (checked before the item loads).
        import torch.distributed.checkpoint as dcp

        dcp.save({"w": torch.tensor([self.value])}, checkpoint_id=str(path / "dcp"), no_dist=True)
        (path / ".metadata").write_bytes((path / "dcp" / ".metadata").read_bytes())

    def load_checkpoint(self, path):
        self.value = json.loads((path / "state.json").read_text())


def test_self_saving_item_is_saved_beside_the_dcp_state_and_backends_do_not_mix(tmp_path):
    mgr = CheckpointManager(CheckpointConfig(every=1), tmp_path)
    model, opt = _setup()
    item = _SelfSaving(1.5)
    path = mgr.save(2, {"net": model, "eng": item}, {"net": (model, opt)}, {"at": 2})
    assert (path / "engine" / "eng" / "state.json").is_file() and not (path / "engine" / "net").exists()
    fresh = _SelfSaving(0.0)
    assert mgr.load(path, {"net": model, "eng": fresh}, {"net": (model, opt)})["at"] == 2
    assert fresh.value == 1.5
    # A run whose model "eng" is a plain module (the torch backend) cannot take the engine's format...
    with pytest.raises(CheckpointError, match="model 'eng' was saved by its engine's own checkpoint format"):
        mgr.load(path, {"net": model, "eng": torch.nn.Linear(1, 1)}, {"net": (model, opt)})
    # ... nor the other way round.
    plain = mgr.save(3, {"net": model, "eng": torch.nn.Linear(1, 1)}, {"net": (model, opt)}, {})
    with pytest.raises(CheckpointError, match="model 'eng' was saved without its engine's own checkpoint format"):
        mgr.load(plain, {"net": model, "eng": _SelfSaving(0.0)}, {"net": (model, opt)})
