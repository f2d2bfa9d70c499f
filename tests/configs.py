"""The tiny training run the unit tests build on: one place for its settings, each test naming only what it
changes."""

from __future__ import annotations

from pyrozoo.config import TrainConfig

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
