"""Divergence checks, a loop callback: a loss or a posterior that left the numbers stops the run with a
:class:`pyrozoo.errors.TrainingDiverged` that says how to go on from the last committed epoch."""

from __future__ import annotations

import math

import torch

from pyrozoo.errors import TrainingDiverged
from pyrozoo.loop import Callback


class Divergence(Callback):
    """A non-finite loss after a step, or a degenerate posterior after an epoch, is a diverged run."""

    def after_step(self, loop, loss: float) -> None:
        if not math.isfinite(loss):
            p = loop.progress
            raise TrainingDiverged(_message(loop, p.step + 1, f"the loss became {loss}"))

    def after_steps(self, loop) -> None:
        """A posterior whose locs or scales left the numbers (or whose scales collapsed to 0) is a diverged
        run too, even while the loss still looks finite (found after the epoch's last step)."""
        guide = loop.setup.guide
        for site, (loc, scale) in guide.posterior().items():
            collapsed = not guide.point_mass and not bool((scale > 0).all())
            if collapsed or not bool(torch.isfinite(loc).all() and torch.isfinite(scale).all()):
                what = f"the posterior of {site} became degenerate"
                raise TrainingDiverged(_message(loop, loop.progress.step, what))


def _message(loop, step: int, what: str) -> str:
    """What diverged at ``step``, and how to go on: resume the last committed epoch with a smaller --lr."""
    epoch, out = loop.progress.epoch, loop.folder.path
    lower = f"{loop.config.lr / 10:g}"
    if epoch == 0:
        advice = (
            f"no epoch was finished, so there is nothing to resume: run the same command again with a "
            f"smaller --lr (e.g. --lr {lower})"
        )
    else:
        advice = (
            f"{out} keeps the state after epoch {epoch}; resume it with a smaller learning rate: "
            f"pyrozoo train --out {out} --resume --lr {lower} --override lr"
        )
    return f"{what} at epoch {epoch + 1}, step {step}; {advice}"
