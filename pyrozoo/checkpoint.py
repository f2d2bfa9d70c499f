"""A run's state in a checkpoint, and the loop's :class:`Commit` callback, which commits each epoch.

An epoch is committed by the rename of ``checkpoint.pt`` (:meth:`pyrozoo.runfolder.RunFolder.commit`), which
holds the state after the epoch and the metrics rows up to it; ``metrics.csv``, their copy, is written just
before it, and after the last epoch ``scales.csv`` before both, so a run that cannot write it is not finished.
"""

from __future__ import annotations

import torch

from pyrozoo.bmr.compact import CannotCompact, compact_to
from pyrozoo.bmr.scores import posterior_scales, scale_table
from pyrozoo.errors import PyrozooError, reason
from pyrozoo.loop import Callback, Progress
from pyrozoo.lr_units import set_lr
from pyrozoo.runfolder import BMR_LOG, CHECKPOINT, CONFIG, METRICS, SCALES


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def snapshot(setup, progress: Progress) -> dict:
    """What checkpoint.pt holds: the state of ``setup`` after ``progress``, with the rows it commits."""
    return {
        "epoch": progress.epoch,
        "step": progress.step,
        "seconds": progress.seconds,
        "guide": setup.guide.state_dict(),
        "model": setup.model.state_dict(),
        "optimizer": setup.optimizer.state_dict(),
        "batches": setup.batches.state_dict(),
        "rng": _rng_state(),
        "history": progress.history,  # the metrics rows this checkpoint commits (metrics.csv is their copy)
        "bmr_log": progress.bmr_log,  # and the BMR log's rows (bmr.csv)
        "kept": setup.model.kept,  # a compacted run: the original indices its layers still hold
    }


def restore(setup, folder) -> Progress:
    """Load the checkpoint of run folder ``folder`` into ``setup``; returns the progress it commits."""
    state = folder.checkpoint()
    try:
        if state.get("kept"):  # a compacted run: its shapes first, from the original indices it kept
            compact_to(setup.model, setup.guide, setup.optimizer, state["kept"])
        setup.guide.load_state_dict(state["guide"])
        setup.model.load_state_dict(state["model"])
        setup.optimizer.load_state_dict(state["optimizer"])
        setup.batches.load_state_dict(state["batches"])
        _set_rng_state(state["rng"])
    except (RuntimeError, KeyError, ValueError, TypeError, CannotCompact) as e:
        raise PyrozooError(
            f"{folder.path / CHECKPOINT} does not fit the run its {CONFIG} describes ({reason(e)}): restore "
            f"the two files from one run, or delete {folder.path} and train again"
        ) from None
    set_lr(setup.optimizer, setup.config.lr)  # the run's learning rate, which --override may have changed
    history, bmr_log = folder.history(state), folder.bmr_log(state)
    return Progress(state["epoch"], state["step"], state["seconds"], history, bmr_log)


class Commit(Callback):
    """Commit every epoch: metrics.csv, then the checkpoint (after the last epoch, scales.csv before both).
    At the start, the folder's config.json says what the run now is (``record``, a resumed run may have been
    extended) and its tables hold only the committed rows."""

    def __init__(self, record: dict):
        self.record = record

    def start(self, loop) -> None:
        folder, p = loop.folder, loop.progress
        folder.write_record(self.record)
        if p.history or (folder.path / METRICS).exists():  # drop rows past the checkpoint, mend a bad file
            folder.write_table(METRICS, p.history)
        if p.bmr_log or (folder.path / BMR_LOG).exists():
            folder.write_table(BMR_LOG, p.bmr_log)

    def end_of_epoch(self, loop, row: dict) -> None:
        setup, p = loop.setup, loop.progress
        if p.epoch == loop.config.epochs:
            write_scales(setup, loop.folder)
        loop.folder.write_table(METRICS, p.history)
        loop.folder.commit(snapshot(setup, p))  # the commit: the epoch is done once this rename is


def write_scales(setup, folder) -> None:
    """The per-layer posterior scales (shrinkage, for a hierarchical prior), from a random stream of their own,
    so that the checkpoint's random state is what a longer run would continue from."""
    if setup.guide.point_mass or not setup.world.main:
        return
    devices = [setup.data.x_test.device] if setup.data.x_test.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        table = scale_table(posterior_scales(setup.model, setup.guide))
    folder.write_table(SCALES, table)
