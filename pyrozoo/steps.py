"""How a run trains, chosen by its method (``Method.step``): the optimiser it builds and one training step.

- ``svi``: stochastic variational inference, a gradient step on ``-ELBO`` with an optimiser from
  :data:`pyrozoo.optim.OPTIMIZERS` over the guide's parameters.
- ``ivon``: the IVON optimiser trains the plain net and is itself the posterior (pyrozoo.guides.ivon).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import pyro
import torch

from pyrozoo.elbo import negative_elbo
from pyrozoo.errors import PyrozooError
from pyrozoo.guides.ivon import ivon_step
from pyrozoo.lr_units import make_optimizer
from pyrozoo.registry import Registry


# Set to 1 to keep Pyro's and torch's checks of distribution arguments and sample values on while training
# (for debugging a model or prior): they cost 7-11% of a step (experiments/RESULTS.md), so training turns them
# off otherwise.
VALIDATE_ENV = "PYROZOO_VALIDATE"


def validating() -> bool:
    """Whether ``$PYROZOO_VALIDATE`` asks for Pyro's and torch's argument checks while training."""
    return os.environ.get(VALIDATE_ENV) == "1"


def svi_step(
    model,
    guide,
    optimizer: torch.optim.Optimizer,
    x,
    y,
    dataset_size: int,
    validate: bool | None = None,
    share=None,
    loss: Callable = negative_elbo,
) -> float:
    """One stochastic-gradient step on ``loss`` (``-ELBO``); returns the loss. ``validate`` (default: whether
    ``$PYROZOO_VALIDATE`` is 1) turns Pyro's and torch's argument checks on or off for the step only, whatever
    Pyro's own setting (on by default, and slow). ``share`` (a data-parallel run's, see
    :meth:`pyrozoo.distributed.World.share_hook`) turns this process's gradients and loss into the run's."""
    with pyro.validation_enabled(validating() if validate is None else validate):
        value = loss(model, guide, x, y, dataset_size)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    if share is not None:
        value = share(value, optimizer)
    optimizer.step()
    return value.item()


@dataclass(frozen=True)
class TrainingStep:
    """A way of training: ``optimizer(model, guide, lr, optimizer_name, dataset_size, lr_units)`` builds the
    optimiser, ``step(model, guide, optimizer, x, y, dataset_size)`` takes one step and returns ``-ELBO``'s
    estimate."""

    description: str
    optimizer: Callable
    step: Callable
    guide: str | None  # the one guide this step trains (None: any guide with parameters)
    optimizer_name: (
        str | None
    )  # the one optimiser it trains with (None: any of OPTIMIZERS no other step owns)
    # the posterior scale (in z) a run started from trained weights gets: a number, "laplace" (each weight's
    # diagonal Laplace scale, pyrozoo.posteriors.laplace.start_curvature) or None (the guide's own initial one)
    init_scale: float | str | None
    parallel: bool = (
        False  # whether it trains data-parallel (torchrun), its gradients shared between processes
    )


STEPS = Registry("training step")
STEPS.register(
    "svi",
    TrainingStep(
        "stochastic variational inference: a gradient step on -ELBO",
        # deterministic parameters (BatchNorm's affine) are point estimates trained beside the guide; lr is in
        # the run's units (pyrozoo.lr_units), each weight latent's loc a group of its own in weight units
        lambda model, guide, lr, name, n, units="latent": make_optimizer(model, guide, lr, units, name),
        svi_step,
        None,
        None,
        "laplace",
        parallel=True,
    ),
)
STEPS.register(
    "ivon",
    TrainingStep(
        "IVON (ivon-opt) trains the plain net; its state is the posterior",
        lambda model, guide, lr, name, n, units="latent": _ivon_optimizer(model, guide, lr, n),
        ivon_step,
        "ivon",
        "ivon",
        None,  # IVON's hess_init sets its initial posterior; a tiny scale would be a huge Hessian, frozen steps
    ),
)


def _ivon_optimizer(model, guide, lr: float, dataset_size: int):
    if model.deterministic_parameters():
        raise PyrozooError(
            "the ivon methods train only the net's random layers; this net has deterministic parameters "
            "(BatchNorm's affine, or modules selected deterministic), which IVON would leave untrained"
        )
    return guide.make_optimizer(lr, dataset_size)
