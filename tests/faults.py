"""Fault injection for the reliability tests: ``python tests/faults.py ARGV`` is ``pyrozoo ARGV`` that stops itself
at a named point, as a crash would (also under ``torchrun``, as a script).

``$PYROZOO_FAULT=POINT[@N][:stop]`` makes the N-th time (default the first) that the process reaches ``POINT``
send itself SIGKILL (with ``:stop``, SIGSTOP, to hold it there). The points are ``step`` (a training step
taken, its epoch not committed), ``bmr`` (a pass made, the epoch not committed), ``eval`` (an evaluation
made, not committed), ``write`` (a file fully written under its temporary name, not renamed), ``metrics`` (an
epoch's metrics.csv renamed, its checkpoint not) and ``commit`` (an epoch committed). The product has no hook
for them: the training points are loop callbacks placed after the product's own, the commit points a wrapper
around the run folder's commit, and ``write`` one around the rename that every write ends with. A kill leaves the files as a power-on machine would see them
after ``kill -9``; the tests resume from there.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "PYROZOO_FAULT"
POINTS = ("step", "bmr", "eval", "write", "metrics", "commit")


class Fault:
    """Kill (or stop) this process at the ``nth`` time it reaches ``point``."""

    def __init__(self, spec: str):
        where, _, action = spec.partition(":")
        self.point, _, nth = where.partition("@")
        assert self.point in POINTS, spec
        self.nth, self.hits = int(nth or 1), 0
        self.signal = signal.SIGSTOP if action == "stop" else signal.SIGKILL

    def reached(self, point: str) -> None:
        if point != self.point:
            return
        self.hits += 1
        if self.hits == self.nth:
            os.kill(os.getpid(), self.signal)


def install(fault: Fault) -> None:
    """Put ``fault``'s points into pyrozoo: callbacks into every training loop, a wrapper around os.replace."""
    from pyrozoo import loop
    from pyrozoo.evaluation import Evaluate
    from pyrozoo.schedule import BMRSchedule

    class Reached(loop.Callback):
        def __init__(self, point: str):
            self.point = point

        def after_step(self, training, loss: float) -> None:
            if self.point == "step":
                fault.reached("step")

        def end_of_epoch(self, training, row: dict) -> None:
            made = {"bmr": row["bmr_seconds"] == row["bmr_seconds"], "eval": "eval_seconds" in row}
            if made.get(self.point):
                fault.reached(self.point)

    train = loop.train

    def faulted(setup, folder, callbacks=(), *args, **kwargs):
        callbacks = list(callbacks)
        after = {"bmr": BMRSchedule, "eval": Evaluate}.get(fault.point)
        where = [i for i, c in enumerate(callbacks) if after and isinstance(c, after)]
        callbacks.insert(where[0] + 1 if where else 0, Reached(fault.point))
        commit = folder.commit

        def committed(state: dict) -> None:  # metrics.csv is renamed just before
            fault.reached("metrics")
            commit(state)
            fault.reached("commit")

        folder.commit = committed
        return train(setup, folder, callbacks, *args, **kwargs)

    loop.train = faulted
    replace = os.replace

    def renamed(source, target, *args, **kwargs):
        if str(source).endswith(".tmp"):  # an atomic write's temporary file, fully written
            fault.reached("write")
        replace(source, target, *args, **kwargs)

    os.replace = renamed


if __name__ == "__main__":
    if os.environ.get(ENV):
        install(Fault(os.environ[ENV]))
    from pyrozoo.cli import main

    sys.exit(main(sys.argv[1:]))
