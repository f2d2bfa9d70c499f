"""The training loop: epochs of minibatch steps, with everything else a callback.

:func:`train` takes a :class:`pyrozoo.build.Setup` (what trains), a :class:`pyrozoo.runfolder.RunFolder` (where
the run lives) and callbacks, which it calls at the start, after every step and at the end of every epoch, in
their order. pyrozoo's own are the divergence checks (:mod:`pyrozoo.divergence`), the BMR schedule with its
compaction (:mod:`pyrozoo.schedule`), the evaluation (:mod:`pyrozoo.evaluation`) and the commit of each epoch
(:mod:`pyrozoo.checkpoint`); :func:`pyrozoo.train.callbacks` lists them in the order a run uses.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pandas as pd
import pyro
from tqdm.auto import tqdm

from pyrozoo.bmr.units import pruned_fraction
from pyrozoo.errors import PyrozooError
from pyrozoo.runfolder import RunFolder
from pyrozoo.steps import validating


@dataclass
class Progress:
    """How far a run has trained: the epochs and steps done, the seconds they took, the metrics rows of the
    epochs and the BMR log (one row per pass and layer: the reason for every removal)."""

    epoch: int = 0
    step: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    bmr_log: list[dict] = field(default_factory=list)

    def metrics(self) -> pd.DataFrame:
        return pd.DataFrame(self.history)


class Callback:
    """A part of training that the loop calls; each hook does nothing unless a subclass says otherwise."""

    def start(self, loop: "Training") -> None:
        """Before the first step of this call of :func:`train`."""

    def catch_up(self, loop: "Training", row: dict) -> None:
        """At the start, when the last committed epoch had no BMR pass (``row``, its metrics row): a run
        extended past what was its last epoch gets what that epoch skipped."""

    def after_step(self, loop: "Training", loss: float) -> None:
        """After each training step, with its loss."""

    def after_steps(self, loop: "Training") -> None:
        """After the last step of an epoch, before the epoch is counted."""

    def end_of_epoch(self, loop: "Training", row: dict) -> None:
        """After each epoch (already counted in ``loop.progress``), with its metrics row to fill in."""


@dataclass
class Training:
    """What the callbacks see: the setup, the run folder, the progress and the log."""

    setup: object  # a pyrozoo.build.Setup (not imported: the builder is above the loop)
    folder: RunFolder
    progress: Progress
    log: object = print

    @property
    def config(self):
        return self.setup.config


def train(
    setup,
    folder: RunFolder,
    callbacks=(),
    progress: Progress | None = None,
    log=print,
    show_progress: bool = True,
) -> pd.DataFrame:
    """Train ``setup`` (a :class:`pyrozoo.build.Setup`) to its config's epochs from ``progress`` (a new run's
    when None), calling ``callbacks``; returns the metrics table.

    ``folder`` is required, opened for writing: the callbacks write the run into it (bmr.csv, metrics.csv, the
    checkpoint) and name it in their messages. A new run in Python, as :class:`pyrozoo.train.Run` trains it::

        setup = build(config)
        with RunFolder.for_writing(out, resume=False) as folder:
            record = config_record(setup)
            folder.write_record(record)
            train(setup, folder, callbacks(setup, record))

    (:func:`pyrozoo.build.build`, :func:`pyrozoo.trained.config_record`, :func:`pyrozoo.train.callbacks`.)
    """
    if not isinstance(folder, RunFolder):
        raise PyrozooError(
            f"train needs the run's folder, not {folder!r}: open one with RunFolder.for_writing(out, "
            "resume=False) (its callbacks write the run there)"
        )
    loop = Training(setup, folder, progress or Progress(), log)
    p, c = loop.progress, setup.config
    for callback in callbacks:
        callback.start(loop)
    bar = tqdm(
        total=c.epochs * c.steps_per_epoch,
        initial=p.epoch * c.steps_per_epoch,
        unit="step",
        desc=f"{c.net} {c.method}",
        disable=not show_progress or not setup.world.main,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    with bar, pyro.validation_enabled(validating()):
        if p.history and math.isnan(p.history[-1]["bmr_seconds"]):
            for callback in callbacks:
                callback.catch_up(loop, p.history[-1])
        while p.epoch < c.epochs:
            losses = _epoch(loop, callbacks, bar)
            row = {
                "epoch": p.epoch,
                "step": p.step,
                "seconds": round(p.seconds, 3),
                "elbo": -sum(losses) / len(losses),
                "bmr_seconds": float("nan"),
                "pruned_fraction": pruned_fraction(setup.model),
            }
            p.history.append(row)
            for callback in callbacks:
                callback.end_of_epoch(loop, row)
            shown = "accuracy" if "accuracy" in row else "rmse" if "rmse" in row else None
            if shown:
                bar.set_postfix(loss=f"{losses[-1]:.4g}", **{shown[:4]: f"{row[shown]:.4f}"})
    return p.metrics()


def _epoch(loop: Training, callbacks, bar) -> list[float]:
    """One epoch of steps; returns their losses."""
    setup, p = loop.setup, loop.progress
    start, losses = time.perf_counter(), []
    for _ in range(setup.config.steps_per_epoch):
        part, weight = setup.world.split(setup.batches.next())  # this process's part of the batch
        share = setup.world.share_hook(weight)  # None in one process
        shared = {} if share is None else {"share": share}
        loss = setup.step.step(setup.model, setup.guide, setup.optimizer, *setup.batch(part), **shared)
        for callback in callbacks:
            callback.after_step(loop, loss)
        losses.append(loss)
        p.step += 1
        bar.update()
        if p.step % 50 == 0:
            bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
    p.seconds += time.perf_counter() - start
    setup.world.sync_rng()  # keep the ranks' random streams one (what rank 0 checkpoints)
    for callback in callbacks:
        callback.after_steps(loop)
    p.epoch += 1
    return losses
