"""Tests for pyrozoo.trained: a finished run loads at its committed epoch with the metrics it committed, a folder
that holds no run is one error, and the config.json record round-trips."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from test_io import Holder, try_in_another_process

from pyrozoo.errors import PyrozooError
from pyrozoo.runfolder import CHECKPOINT, CONFIG, METRICS, RunFolder
from pyrozoo.trained import load


def test_a_finished_run_loads_with_the_metrics_it_committed(map_run):
    with load(map_run, log=print) as run:
        assert run.epoch == run.config.epochs == 1 and run.step == 20
        pd.testing.assert_frame_equal(run.metrics(), RunFolder(map_run).metrics())
        pd.testing.assert_frame_equal(run.metrics(), pd.read_csv(map_run / METRICS), check_dtype=False)
        assert run.record() == json.loads((map_run / CONFIG).read_text())  # what config.json says, again
        # a point mass evaluates as the run did after its last epoch
        assert run.evaluate()["accuracy"] == pytest.approx(run.metrics()["accuracy"].iloc[-1])


def test_a_loaded_run_holds_its_folder_until_closed(map_run):
    run = load(map_run, log=print)
    assert "is in use by process" in try_in_another_process(map_run)
    run.close()
    assert try_in_another_process(map_run) == "ok"


@pytest.mark.parametrize("folder", ["missing", "empty", "other"])
def test_a_folder_that_holds_no_run_is_one_error_and_is_left_as_it_was(tmp_path, folder):
    path = tmp_path / folder
    if folder != "missing":
        path.mkdir()
    if folder == "other":
        (path / "notes.txt").write_text("not a run")
    before = sorted(p.name for p in path.iterdir()) if path.exists() else None
    with pytest.raises(PyrozooError, match=f"{path} holds no run: it has no {CONFIG}") as info:
        load(path, log=print)
    assert "\n" not in str(info.value)
    assert (sorted(p.name for p in path.iterdir()) if path.exists() else None) == before


def test_a_run_without_a_checkpoint_is_one_error(map_run):
    (map_run / CHECKPOINT).unlink()
    with pytest.raises(PyrozooError, match=f"it has no {CHECKPOINT}"):
        load(map_run, log=print)


def test_a_read_only_load_takes_no_lock_and_writes_nothing(map_run):
    """What predict opens: a run another process holds (training it, or a reader that writes) still loads, and
    the read-only folder refuses writes."""
    holder = Holder(map_run)
    try:
        before = {p.name: p.read_bytes() for p in map_run.iterdir() if p.is_file()}
        with pytest.raises(PyrozooError, match=f"is in use by process {holder.pid}"):
            load(map_run, log=print)  # a writer is still refused
        with load(map_run, log=print, write=False) as run, load(map_run, log=print, write=False) as again:
            assert run.epoch == again.epoch == 1
            pd.testing.assert_frame_equal(run.metrics(), RunFolder(map_run).metrics())
            with pytest.raises(PyrozooError, match="opened read-only"):
                run.folder.write_table(METRICS, [])
        assert {p.name: p.read_bytes() for p in map_run.iterdir() if p.is_file()} == before
    finally:
        holder.stop()
