"""TrainLoop without a model: resume from a checkpoint's loop state, metrics every N steps, the
checkpoint hook after every step, and the max_minutes stop (message naming the config key)."""

import io

from moslim_mega.training.loop import LoopConfig, TrainLoop


class Writer:
    def __init__(self):
        self.rows = []

    def write(self, step, row, tag="train"):
        self.rows.append((step, tag, dict(row)))


class Ckpt:
    """StageCheckpoints' two calls: restore() → loop state or None, after_step(steps_done, state)."""

    def __init__(self, state=None):
        self.state, self.saved = state, []

    def restore(self):
        return self.state

    def after_step(self, steps_done, loop_state):
        self.saved.append((steps_done, loop_state()))


def test_fresh_run_writes_every_n_steps_and_checkpoints_every_step():
    writer, ckpt, done, after = Writer(), Ckpt(), [], []
    loop = TrainLoop(LoopConfig("t", 7, log_every=3, show_progress=False), writer=writer, ckpt=ckpt)
    first = loop.resume(lambda s: None)
    res = loop.run(first, lambda step: done.append(step) or {"x": step}, lambda: {"n": len(done)}, after.append)
    assert first == 0 and done == after == list(range(7))
    assert [r[0] for r in writer.rows] == [0, 3, 6]
    assert ckpt.saved == [(i + 1, {"n": i + 1}) for i in range(7)]
    assert {k: res[k] for k in ("steps", "planned_steps", "stopped_by_max_minutes")} == {
        "steps": 7, "planned_steps": 7, "stopped_by_max_minutes": False}


def test_resume_continues_after_the_checkpoints_steps_with_its_loop_state():
    ckpt, loaded, done = Ckpt({"steps_done": 4, "order": [3, 1]}), [], []
    loop = TrainLoop(LoopConfig("t", 6, show_progress=False), ckpt=ckpt)
    first = loop.resume(loaded.append)
    res = loop.run(first, lambda step: done.append(step) or {})
    assert first == 4 and loaded == [{"steps_done": 4, "order": [3, 1]}] and done == [4, 5]
    assert [s for s, _ in ckpt.saved] == [5, 6] and res["steps"] == 6
    # A run that was already complete runs no step and is not "stopped".
    again = TrainLoop(LoopConfig("t", 6, show_progress=False), ckpt=Ckpt({"steps_done": 6}))
    res = again.run(again.resume(lambda s: None), lambda step: done.append(step) or {})
    assert done == [4, 5] and res["steps"] == 6 and not res["stopped_by_max_minutes"]


def test_max_minutes_stops_after_the_step_that_ran_out_naming_the_key(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    done = []
    loop = TrainLoop(LoopConfig("sft", 5, max_minutes=1e-9, max_minutes_key="sft.max_minutes", show_progress=False))
    res = loop.run(0, lambda step: done.append(step) or {})
    assert done == [0] and res["steps"] == 1 and res["planned_steps"] == 5 and res["stopped_by_max_minutes"]
    assert "sft: stopping at step 0 of 5 (sft.max_minutes=1e-09 was hit" in stream.getvalue()
    # The last step is never "stopped": every planned step ran.
    res = TrainLoop(LoopConfig("sft", 1, max_minutes=1e-9, show_progress=False)).run(0, lambda step: {})
    assert res["steps"] == 1 and not res["stopped_by_max_minutes"]
