"""The tiny training run the unit tests build on: one place for its settings, each test naming only what it
changes."""

from __future__ import annotations

import dataclasses
import functools

from pyrozoo.config import TrainConfig
from pyrozoo.steps import svi_step

# The MLP on the bundled subset, a handful of steps: seconds on one CPU thread.
TINY = dict(
    net="mlp",
    data="fashion-mnist-mini",
    method="flat-ff",
    epochs=2,
    steps_per_epoch=6,
    batch_size=64,
    samples=2,
    eval_batch_size=400,
    seed=0,
    net_options={"hidden": (32,)},
)


def tiny_config(**changes) -> TrainConfig:
    """:data:`TINY` with ``changes`` (TrainConfig's fields) applied."""
    return TrainConfig(**{**TINY, **changes})


def quiet(text: str) -> None:
    raise AssertionError(f"unexpected log message: {text}")  # an explicit dataset never warns


def with_loss(run, loss) -> None:
    """The run's SVI steps on ``loss`` instead of -ELBO: the seam the tests inject a failing loss through."""
    run.setup.step = dataclasses.replace(run.setup.step, step=functools.partial(svi_step, loss=loss))
