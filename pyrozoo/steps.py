"""How a run trains, chosen by its method (``Method.step``): the optimiser it builds and one training step.

- ``svi``: stochastic variational inference, a gradient step on ``-ELBO`` with an optimiser from
  :data:`pyrozoo.optim.OPTIMIZERS` over the guide's parameters.
- ``ivon``: the IVON optimiser trains the plain net and is itself the posterior (pyrozoo.guides.ivon).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pyrozoo.guides.ivon import ivon_step
from pyrozoo.optim import OPTIMIZERS
from pyrozoo.registry import Registry


def svi_step(model, guide, optimizer: torch.optim.Optimizer, x, y, dataset_size: int, share=None) -> float:
    """:func:`pyrozoo.train.svi_step`, looked up at each call: it stays in pyrozoo.train, whose ``negative_elbo``
    the reliability tests replace to inject failures. ``share``: a data-parallel run's gradient sharing."""
    from pyrozoo import train

    return train.svi_step(model, guide, optimizer, x, y, dataset_size, share=share)


@dataclass(frozen=True)
class TrainingStep:
    """A way of training: ``optimizer(model, guide, lr, optimizer_name, dataset_size)`` builds the optimiser,
    ``step(model, guide, optimizer, x, y, dataset_size)`` takes one step and returns ``-ELBO``'s estimate."""

    description: str
    optimizer: Callable
    step: Callable
    guide: str | None  # the one guide this step trains (None: any guide with parameters)
    optimizer_name: (
        str | None
    )  # the one optimiser it trains with (None: any of OPTIMIZERS no other step owns)
    # the posterior scale (in z) a run started from trained weights gets; None: the guide's own initial one
    init_scale: float | None


STEPS = Registry("training step")
STEPS.register(
    "svi",
    TrainingStep(
        "stochastic variational inference: a gradient step on -ELBO",
        # deterministic parameters (BatchNorm's affine) are point estimates trained beside the guide
        lambda model, guide, lr, name, n: OPTIMIZERS[name](
            [*guide.parameters(), *model.deterministic_parameters()], lr=lr
        ),
        svi_step,
        None,
        None,
        1e-3,
    ),
)
STEPS.register(
    "ivon",
    TrainingStep(
        "IVON (ivon-opt) trains the plain net; its state is the posterior",
        lambda model, guide, lr, name, n: _ivon_optimizer(model, guide, lr, n),
        ivon_step,
        "ivon",
        "ivon",
        None,  # IVON's hess_init sets its initial posterior; a tiny scale would be a huge Hessian, frozen steps
    ),
)


def _ivon_optimizer(model, guide, lr: float, dataset_size: int):
    from pyrozoo.errors import PyrozooError

    if model.deterministic_parameters():
        raise PyrozooError(
            "the ivon methods train only the net's random layers; this net has deterministic parameters "
            "(BatchNorm's affine, or modules selected deterministic), which IVON would leave untrained"
        )
    return guide.make_optimizer(lr, dataset_size)


def check_step(step: str, guide: str, optimizer: str) -> None:
    """A PyrozooError unless training ``step`` can use ``guide`` and ``optimizer``: a step that owns a guide or an
    optimiser (IVON's posterior is its optimiser's state) takes only those, and no other step takes them."""
    from pyrozoo.errors import PyrozooError

    own = STEPS[step]
    for kind, chosen, wanted in (("guide", guide, own.guide), ("optimizer", optimizer, own.optimizer_name)):
        if wanted is not None and chosen != wanted:
            raise PyrozooError(
                f"this method trains by {step}, which needs the {kind} {wanted!r}, not {chosen!r}"
            )
        owners = [
            name
            for name, other in STEPS.items()
            if chosen in (other.guide, other.optimizer_name) and name != step
        ]
        if wanted is None and owners:
            raise PyrozooError(
                f"the {kind} {chosen!r} is trained only by {owners[0]} (methods "
                f"{', '.join(m for m, x in _methods().items() if x.step == owners[0])}), not by {step}"
            )


def _methods():
    from pyrozoo.methods import METHODS

    return METHODS
