"""Training a run in its folder: :class:`Run`, the builder (:mod:`pyrozoo.build`), the run folder
(:mod:`pyrozoo.runfolder`) and the loop (:mod:`pyrozoo.loop`) with pyrozoo's callbacks, put together.

A new run: ``Run(config, out).train()``; a killed or finished one goes on with ``Run.open(out, epochs=...)``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import pandas as pd

from pyrozoo import distributed, loop
from pyrozoo.bind import bind
from pyrozoo.checkpoint import Commit
from pyrozoo.config import OVERRIDABLE, RESUMABLE, TABLES, TrainConfig, as_stored, fold_aliases
from pyrozoo.divergence import Divergence
from pyrozoo.errors import PyrozooError
from pyrozoo.evaluation import Evaluate
from pyrozoo.schedule import BMRSchedule, Compaction
from pyrozoo.trained import TrainedRun, open_run, stored_record


def callbacks(setup, record: dict) -> list[loop.Callback]:
    """pyrozoo's callbacks of a run, in the order the loop calls them: the divergence checks, the BMR schedule
    (for a method that prunes while training), the evaluation, and the commit that writes ``record`` (what
    config.json says of the run: :func:`pyrozoo.trained.config_record` of ``setup``) into the folder each epoch.
    :func:`pyrozoo.loop.train` shows them used by hand."""
    schedule = [BMRSchedule(Compaction() if setup.config.compact else None)] if setup.bound.reduction else []
    return [Divergence(), *schedule, Evaluate(), Commit(record)]


class Run(TrainedRun):
    """A training run living in folder ``out``: built from a config, or reloaded from the folder's files."""

    def __init__(self, config: TrainConfig, out: str | os.PathLike, *, resume: bool = False, log=print):
        world = distributed.setup()  # a run started by torchrun has several processes; rank 0 writes
        log = log if world.main else lambda text: None
        super().__init__(*open_run(config, out, resume, log, world), log)

    @property
    def reduction(self):
        """The BMR reduction after each epoch but the last (None: the run prunes nothing while training)."""
        return self.setup.bound.reduction

    @reduction.setter
    def reduction(self, reduction) -> None:
        self.setup.bound = dataclasses.replace(self.setup.bound, reduction=reduction)

    @classmethod
    def open(cls, out: str | os.PathLike, log=print, override=(), **changes) -> "Run":
        """Reopen the run in folder ``out`` at its last committed epoch, to resume it.

        ``changes`` are run options (and net, method, data, seed) as a resumed run is asked for: those in
        ``RESUMABLE`` (more ``epochs``, the evaluation schedule, the device) change the run; any other that
        differs from the stored config is an error naming it, since the run could not be what it says. The
        options named in ``override`` (only those in ``OVERRIDABLE``: the learning rate, which a diverged run
        needs lowered) change the run from its last epoch on; config.json records the new value and, under
        ``overrides``, when it changed.
        """
        override = list(dict.fromkeys(k.replace("-", "_") for k in override))
        config, stored, record = _resumed_config(out, override, changes)
        run = cls(config, out, resume=True, log=log)
        try:
            _check_extension(run, override)
        except PyrozooError:
            run.close()
            raise
        run.overrides = list(record.get("overrides", []))
        for key in override:
            before, after = getattr(stored, key), getattr(run.config, key)
            if before != after:
                run.overrides.append(
                    {"option": key, "from": before, "to": after, "epoch": run.epoch, "step": run.step}
                )
                log(f"--override: {key} {before} -> {after} after epoch {run.epoch} (step {run.step})")
        return run

    def train(self, progress: bool = True, more: Sequence[loop.Callback] = ()) -> pd.DataFrame:
        """Train the remaining epochs, committing each (metrics, then the checkpoint that holds them); returns
        the metrics table. ``more`` callbacks come after pyrozoo's own (:func:`callbacks`)."""
        steps = [*callbacks(self.setup, self.record()), *more]
        return loop.train(self.setup, self.folder, steps, self.progress, self.log, show_progress=progress)


def _resumed_config(out, override: list[str], changes: dict) -> tuple[TrainConfig, TrainConfig, dict]:
    """The config of the run in ``out`` with ``changes`` (checked: only what a resumed run may change), the
    stored config resolved, and the stored record."""
    for key in override:
        if key not in OVERRIDABLE:
            raise PyrozooError(
                f"--override {key}: only {', '.join(OVERRIDABLE)} may be overridden on a resumed run"
            )
        if key not in changes:
            raise PyrozooError(f"--override {key} needs the new value: give --{key.replace('_', '-')} too")
    distributed.setup()  # before the lock: in a data-parallel run only rank 0 takes it
    record = stored_record(out)
    config = TrainConfig.from_record(record["config"])
    stored = bind(config).config
    changes = fold_aliases(changes)
    for key, value in changes.items():
        if key in TABLES:
            changes[key] = {**getattr(config, key), **value}
    differ = [
        f"--{key.replace('_', '-')} ({getattr(stored, key)!r} in the run, {value!r} asked for)"
        for key, value in changes.items()
        if key not in RESUMABLE
        and key not in override
        and as_stored(value) not in (as_stored(getattr(stored, key)), as_stored(getattr(config, key)))
    ]
    if differ:
        allowed = " (the learning rate may be lowered with --override lr)" if "lr" in changes else ""
        raise PyrozooError(
            f"{out} was trained with other settings; --resume cannot change {', '.join(differ)}: "
            f"start a new run in another --out{allowed}"
        )
    allowed = (*RESUMABLE, *override)
    config = dataclasses.replace(config, **{k: v for k, v in changes.items() if k in allowed})
    return config, stored, record


def _check_extension(run: Run, override: list[str]) -> None:
    """A resumed run is only ever extended, and an override must change something it trains."""
    if run.epoch > run.config.epochs:
        raise PyrozooError(
            f"{run.out} has finished {run.epoch} epochs; --epochs {run.config.epochs} would shorten it, "
            "and a run is only ever extended"
        )
    if override and run.epoch >= run.config.epochs:
        raise PyrozooError(
            f"{run.out} has finished its {run.epoch} epochs, so --override {', '.join(override)} would "
            f"change nothing it trained: extend it with --epochs N (more than {run.epoch}) to train on with the "
            "new value, or start a new run in another --out"
        )
