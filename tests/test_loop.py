"""Tests for pyrozoo.loop: the hooks the loop calls and in which order, a callback that raises, and the run
folder it needs."""

from __future__ import annotations

import pytest
from configs import tiny_config

from pyrozoo.build import build
from pyrozoo.errors import PyrozooError
from pyrozoo.loop import Callback, train
from pyrozoo.runfolder import RunFolder
from pyrozoo.train import callbacks
from pyrozoo.trained import config_record


class Recording(Callback):
    """Notes each hook called, with the epoch and step the loop's progress says at that moment."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def _note(self, hook, loop):
        self.calls.append((self.name, hook, loop.progress.epoch, loop.progress.step))

    def start(self, loop):
        self._note("start", loop)

    def catch_up(self, loop, row):
        self._note("catch_up", loop)

    def after_step(self, loop, loss):
        self._note("after_step", loop)

    def after_steps(self, loop):
        self._note("after_steps", loop)

    def end_of_epoch(self, loop, row):
        assert row["epoch"] == loop.progress.epoch  # the epoch is counted before
        self._note("end_of_epoch", loop)


def test_hooks_are_called_in_the_documented_order_each_in_the_callbacks_order(tmp_path):
    setup, calls = build(tiny_config(epochs=2, steps_per_epoch=2), log=print), []
    with RunFolder.for_writing(tmp_path / "run", resume=False) as folder:
        metrics = train(setup, folder, [Recording("a", calls), Recording("b", calls)], show_progress=False)
    assert list(metrics["epoch"]) == [1, 2]
    expected = [("start", 0, 0)]
    for epoch in (0, 1):
        first = 2 * epoch
        expected += [
            ("after_step", epoch, first),
            ("after_step", epoch, first + 1),
        ]  # before the step is counted
        expected += [("after_steps", epoch, first + 2), ("end_of_epoch", epoch + 1, first + 2)]
    assert calls == [(name, *call) for call in expected for name in "ab"]


def test_a_raising_callback_stops_the_loop_and_leaves_the_last_commit(tmp_path):
    class Stop(Callback):
        def after_step(self, loop, loss):
            if loop.progress.step == 3:  # the second step of epoch 2
                raise RuntimeError("stopped")

    setup = build(tiny_config(epochs=3, steps_per_epoch=2))
    with RunFolder.for_writing(tmp_path / "run", resume=False) as folder:
        record = config_record(setup)
        folder.write_record(record)
        calls = []
        with pytest.raises(RuntimeError, match="stopped"):
            train(
                setup, folder, [*callbacks(setup, record), Stop(), Recording("r", calls)], show_progress=False
            )
        assert calls[-1] == ("r", "after_step", 1, 2)  # the callbacks after the raising one are not called
        assert folder.epoch() == 1 and list(folder.metrics()["epoch"]) == [1]
        assert folder.checkpoint()["step"] == 2


def test_a_run_that_skipped_its_last_bmr_pass_catches_up_first(tmp_path):
    """A run resumed past what was its last epoch (which had no BMR pass) gets ``catch_up`` before a step."""
    from pyrozoo.loop import Progress

    setup, calls = build(tiny_config(epochs=2, steps_per_epoch=1)), []
    row = {
        "epoch": 1,
        "step": 1,
        "seconds": 0.0,
        "elbo": 0.0,
        "bmr_seconds": float("nan"),
        "pruned_fraction": 0,
    }
    with RunFolder.for_writing(tmp_path / "run", resume=False) as folder:
        train(setup, folder, [Recording("r", calls)], Progress(1, 1, 0.0, [row]), show_progress=False)
    assert [hook for _, hook, *_ in calls] == [
        "start",
        "catch_up",
        "after_step",
        "after_steps",
        "end_of_epoch",
    ]


@pytest.mark.parametrize("folder", [None, "run"])
def test_the_loop_needs_a_run_folder(folder):
    """The callbacks write the run into its folder: without one (or given a path), one error that says how to
    open it, before anything trains."""
    with pytest.raises(PyrozooError, match=r"RunFolder\.for_writing"):
        train(None, folder, [])
