"""A run opened in its folder, at its last committed epoch: what ``prune``, ``export``, ``predict``,
``uncertainty``, ``sweep``, the plots and the baselines read (:func:`load`), never the trainer.

:func:`load` builds the run from its config.json (:func:`pyrozoo.build.build`) and loads its checkpoint into it.
The folder is opened for writing (its lock held until :meth:`TrainedRun.close`) when the reader writes derived
files into it (pruned.pt, export/, uncertainty.csv); a reader that writes nothing there (``predict``) opens it
read-only, taking no lock, so that it can read a run that is training or that another reader holds (each file it
reads is renamed into place whole, and the checkpoint alone says which epoch is committed).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pyro
import torch

from pyrozoo import distributed
from pyrozoo.build import Setup, build
from pyrozoo.checkpoint import restore
from pyrozoo.config import TrainConfig
from pyrozoo.errors import PyrozooError, reason
from pyrozoo.evaluation import evaluate_setup, net_metrics, point_likelihood, predictive_metrics
from pyrozoo.io import hold_folder
from pyrozoo.loop import Progress
from pyrozoo.runfolder import CHECKPOINT, CONFIG, RunFolder


class TrainedRun:
    """A run's ``setup`` in its run ``folder``, after ``progress``."""

    def __init__(self, setup: Setup, folder: RunFolder, progress: Progress, log=print):
        self.setup, self.folder, self.progress, self.log = setup, folder, progress, log
        self.overrides: list[dict] = []  # the changes --override made to the run, as config.json records them
        self.fitted = False  # whether model and guide are a posterior fitted after training (with_posterior)

    out = property(lambda self: self.folder.path)
    config = property(lambda self: self.setup.config)
    data = property(lambda self: self.setup.data)
    model = property(lambda self: self.setup.model)
    guide = property(lambda self: self.setup.guide)
    optimizer = property(lambda self: self.setup.optimizer)
    epoch = property(lambda self: self.progress.epoch)
    step = property(lambda self: self.progress.step)
    history = property(lambda self: self.progress.history)
    bmr_log = property(lambda self: self.progress.bmr_log)

    def with_posterior(self, model, guide) -> "TrainedRun":
        """The run with a posterior fitted after training (a posterior source's ``fit``: a Laplace model and
        posterior) in place of its own model and guide, for predictions; the same folder, data and epoch."""
        setup = dataclasses.replace(self.setup, model=model, guide=guide)
        other = TrainedRun(setup, self.folder, self.progress, self.log)
        other.overrides, other.fitted = self.overrides, True
        return other

    def close(self) -> None:
        """Give up the run folder's lock (another process may then write to it)."""
        self.folder.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def metrics(self):
        return self.progress.metrics()

    def evaluate(self, samples: int | None = None, on: tuple | None = None) -> dict[str, float]:
        """Test metrics now (or on ``on``, inputs and targets), from ``samples`` posterior draws (default: the
        run's), from a random stream of their own (:func:`pyrozoo.evaluation.evaluate_setup`)."""
        return evaluate_setup(self.setup, self.epoch, samples=samples, on=on)

    def point_likelihood(self):
        return point_likelihood(self.setup)

    def net_metrics(self, net: torch.nn.Module) -> dict[str, float]:
        return net_metrics(self.setup, net)

    def predictive_metrics(self, model, guide, samples: int) -> dict[str, float]:
        return predictive_metrics(self.setup, model, guide, samples)

    def source(self) -> dict:
        """Which committed state this run holds: its epoch, step and the checksum of its checkpoint.pt."""
        return self.folder.source(self.epoch, self.step)

    def record(self) -> dict:
        """What config.json says of the run."""
        return config_record(self.setup, self.overrides)

    def save_pruned(self, report, metrics: dict) -> None:
        """Keep a post-hoc pruned state beside the run's own checkpoint (which stays as trained), with the
        checkpoint it came from (epoch, step, checksum), so that a later use can tell when it is stale."""
        state = {
            "epoch": self.epoch,
            "source": self.source(),
            "guide": self.guide.state_dict(),
            "model": self.model.state_dict(),
            "report": report.table().to_dict("records"),
            "metrics": metrics,
        }
        self.folder.save_pruned(state)

    def load_pruned(self) -> dict:
        """Load the post-hoc pruned state written by :meth:`save_pruned`; returns its metrics. A pruned.pt
        made from another checkpoint than the run's current one (trained further since) is refused."""
        state = self.folder.pruned(self.source())
        try:
            self.guide.load_state_dict(state["guide"])
            self.model.load_state_dict(state["model"])
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            path = self.out / "pruned.pt"
            raise PyrozooError(f"{path} does not fit this run ({reason(e)}): {state['redo']}") from None
        return state["metrics"]


def config_record(setup: Setup, overrides: list[dict] = ()) -> dict:
    """What config.json says of a run: its config, where its data came from, the versions that trained it and
    the changes ``--override`` made."""
    record = {
        "config": dataclasses.asdict(setup.config),
        "data_source": setup.data.source,
        "versions": {"torch": torch.__version__, "pyro": pyro.__version__},
    }
    if overrides:
        record["overrides"] = list(overrides)
    return record


def open_run(
    config: TrainConfig, out: str | os.PathLike, resume: bool, log, world, write: bool = True
) -> tuple:
    """``(setup, folder, progress)`` of the run ``config`` in folder ``out``: a new one (its config.json
    written), or with ``resume`` the one the folder holds, at its last committed epoch; without ``write``
    (only with ``resume``), that one with its folder read-only and unlocked."""
    out = Path(out)
    if resume and not (out / CHECKPOINT).exists():  # checked before the lock, which makes the folder
        raise PyrozooError(f"nothing to {'resume' if write else 'load'} in {out}: it has no {CHECKPOINT}")
    # Everything a user's setting can break (the config, the data, the net options, the batch size) is
    # built before the lock, which makes the folder: a mistake leaves no folder behind.
    setup = build(config, world, log, fresh=not resume)
    # One writer per run folder; in a data-parallel run rank 0 holds it, and the others stop too if it cannot.
    folder = RunFolder.for_writing(out, resume, agree=world.agree) if write else RunFolder(out)
    try:
        progress = restore(setup, folder) if resume else Progress()
        if resume:
            world.sync_rng()
        else:
            folder.write_record(config_record(setup))
    except BaseException:
        folder.close()
        raise
    return setup, folder, progress


def stored_record(out: str | os.PathLike, lock: bool = True) -> dict:
    """The config.json record of the run in ``out``, read while no other process rewrites it (with ``lock``;
    without, as it is now: the file is only ever replaced whole)."""
    if not (Path(out) / CONFIG).exists():
        raise PyrozooError(f"{out} holds no run: it has no {CONFIG}")
    if not lock:
        return RunFolder(out).record()
    with hold_folder(out):
        return RunFolder(out).record()


def load(out: str | os.PathLike, log=print, write: bool = True) -> TrainedRun:
    """The run in folder ``out`` at its last committed epoch, to evaluate, prune or export it. With ``write``
    the folder is locked until :meth:`TrainedRun.close` (the caller writes into it); without, it is opened
    read-only and no lock is taken (a run that is training, or that another reader holds, can be read)."""
    world = distributed.setup()  # before the lock: in a data-parallel run only rank 0 takes it
    record = stored_record(out, lock=write)
    log = log if world.main else lambda text: None
    config = TrainConfig.from_record(record["config"])
    run = TrainedRun(*open_run(config, out, True, log, world, write=write), log)
    run.overrides = list(record.get("overrides", []))
    return run
