"""Tests for pyrozoo.runfolder: a read-only folder writes nothing, one writer at a time, and what a folder reads
back is what was committed (the checkpoint's epoch and metrics, not rows written past it)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from configs import tiny_config
from test_io import Holder, try_in_another_process

from pyrozoo.build import build
from pyrozoo.checkpoint import restore, snapshot
from pyrozoo.errors import PyrozooError
from pyrozoo.loop import Progress
from pyrozoo.runfolder import BMR_LOG, CHECKPOINT, CHECKPOINT_KEYS, CONFIG, METRICS, PRUNED, RunFolder

WRITES = {
    CONFIG: lambda f: f.write_record({"config": {}}),
    METRICS: lambda f: f.write_table(METRICS, [{"epoch": 1}]),
    CHECKPOINT: lambda f: f.commit({"epoch": 1}),
    PRUNED: lambda f: f.save_pruned({"epoch": 1}),
}


def state(epoch: int, history: list[dict]) -> dict:
    """A checkpoint of ``epoch`` committing ``history`` (the keys every checkpoint holds, tiny values)."""
    return {**dict.fromkeys(CHECKPOINT_KEYS, 0), "epoch": epoch, "step": 3 * epoch, "history": history}


@pytest.mark.parametrize("name", WRITES)
def test_a_read_only_folder_refuses_every_write(map_run, name):
    before = {p.name: p.read_bytes() for p in map_run.iterdir() if p.is_file()}
    with pytest.raises(PyrozooError, match=r"opened read-only: open it with RunFolder\.for_writing"):
        WRITES[name](RunFolder(map_run))
    assert {p.name: p.read_bytes() for p in map_run.iterdir() if p.is_file()} == before


def test_for_writing_holds_the_lock_until_closed(tmp_path):
    with RunFolder.for_writing(tmp_path / "run", resume=False) as folder:
        assert "is in use by process" in try_in_another_process(folder.path)
        folder.write_table(METRICS, [{"epoch": 1}])  # it writes
    assert try_in_another_process(folder.path) == "ok"


def test_a_second_writer_is_refused(tmp_path):
    holder = Holder(tmp_path / "run")
    try:
        with pytest.raises(PyrozooError, match=f"is in use by process {holder.pid}"):
            RunFolder.for_writing(tmp_path / "run", resume=True)
    finally:
        holder.stop()


def test_a_folder_with_a_run_is_refused_without_resume_and_left_unlocked(tmp_path):
    with RunFolder.for_writing(tmp_path, resume=False) as folder:
        folder.commit(state(1, [{"epoch": 1}]))
    with pytest.raises(PyrozooError, match="already holds a run; pass --resume"):
        RunFolder.for_writing(tmp_path, resume=False)
    assert try_in_another_process(tmp_path) == "ok"


def test_the_committed_epoch_and_metrics_are_the_checkpoints(tmp_path):
    """Rows written past the checkpoint (a run killed between metrics.csv and the checkpoint) are not read."""
    rows = [{"epoch": 1, "elbo": -3.0}, {"epoch": 2, "elbo": -2.0}]
    with RunFolder.for_writing(tmp_path, resume=False) as folder:
        assert folder.epoch() == 0
        folder.write_table(METRICS, rows)
        folder.write_table(BMR_LOG, [{"epoch": 1, "layer": "fc"}, {"epoch": 2, "layer": "fc"}])
        folder.commit(state(1, rows[:1]) | {"bmr_log": [{"epoch": 1, "layer": "fc"}]})
    reader = RunFolder(tmp_path)
    assert reader.epoch() == 1
    pd.testing.assert_frame_equal(reader.metrics(), pd.DataFrame(rows[:1]))
    assert (
        len(pd.read_csv(tmp_path / METRICS)) == 2
    )  # the file holds the uncommitted row; the reader skips it
    assert reader.bmr_log(reader.checkpoint()) == [{"epoch": 1, "layer": "fc"}]


def test_a_checkpoint_round_trip_gives_back_the_trained_state(tmp_path):
    config = tiny_config(epochs=1, steps_per_epoch=2)
    trained = build(config)
    for _ in range(2):
        trained.step.step(
            trained.model, trained.guide, trained.optimizer, *trained.batch(trained.batches.next())
        )
    progress = Progress(1, 2, 0.5, [{"epoch": 1, "step": 2, "elbo": -1.0}])
    with RunFolder.for_writing(tmp_path, resume=False) as folder:
        folder.commit(snapshot(trained, progress))
    fresh = build(config, fresh=False)
    before = fresh.guide.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in trained.guide.state_dict().items())  # so it can fail
    restored = restore(fresh, RunFolder(tmp_path))  # reading needs no lock
    assert (restored.epoch, restored.step, restored.seconds, restored.history) == (
        1,
        2,
        0.5,
        progress.history,
    )
    for key, value in trained.guide.state_dict().items():
        assert torch.equal(fresh.guide.state_dict()[key], value), key
    assert torch.equal(
        fresh.batches.next(), trained.batches.next()
    )  # the minibatch order goes on where it was
