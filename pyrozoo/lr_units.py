"""What a learning rate measures: a step of the weights (``"weight"``, flat-ff's default) or of the non-centred
latents ``z = w / scale`` (``"latent"``, the reference code's, which the BMR methods keep, and every other
method's: tiered-ff learns a scale per row, and was not measured in weight units).

The weights are ``w = scale * z`` (pyrozoo.models.priors) and the mean-field guide holds ``z``'s locs, so Adam at
lr moves a weight by about ``lr * scale``: with the flat prior's hidden-layer scale of 0.1, ten times less than a
library whose Adam moves ``w`` itself (bayesian-torch) at the same lr (experiments/RESULTS.md, "The learning
rate's meaning, tested"). In weight units each weight latent's loc is its own parameter group, at ``lr / s`` with
``eps * s``, where ``s`` is the layer's prior scale with every hyperparameter at its unconstrained 0 (a flat
prior's layer precision at 1: ``s`` is 0.1 in hidden layers, 1 in the output layer), fixed for the run. Adam's
step does not change when its gradient is multiplied by a constant, so that is exactly Adam on ``s * z`` at lr:
a step in weight units (tests/test_lr_units.py). The posterior scales (a softplus of their raw values, so about
a relative step, the same in either units), the hyperparameters (unconstrained, log scales) and deterministic
parameters keep lr: the posterior scales at lr / s too cost LeNet 1.6 points of accuracy after 3,000 steps
(experiments/RESULTS.md).
"""

from __future__ import annotations

import torch
from torch.distributions import biject_to

from pyrozoo.errors import PyrozooError
from pyrozoo.init_from import hyper_sites, layer_scale
from pyrozoo.optim import OPTIMIZERS

UNITS = ("weight", "latent")


def check_units(units: str) -> None:
    if units not in UNITS:
        raise PyrozooError(
            f"unknown --lr-units {units!r}; choose weight (a step of the weights) or latent (a step of the "
            "non-centred latents z = w / scale, the reference code's)"
        )


def has_weight_units(guide) -> bool:
    """Whether ``guide`` holds each weight latent's loc as its own parameter (all but IVON's do)."""
    return callable(getattr(guide, "loc_parameter", None))


def check_guide(guide, name: str) -> None:
    """Refuse weight units for a guide (an instance or its class, called ``name``) that cannot take them."""
    if not has_weight_units(guide):
        raise PyrozooError(
            f"--lr-units weight needs a guide holding each layer's locs (meanfield, autonormal, autodelta); guide "
            f"{name!r} takes "
            "--lr-units latent"
        )


def weight_scales(model, guide) -> dict[str, float]:
    """``{weight site: s}``: each layer's prior scale with every hyperparameter at its unconstrained 0, reduced to one
    number (the root mean square of a per-row scale, which the shipped priors make equal rows there)."""
    hyper = {}
    for site in hyper_sites(model, guide):  # in double precision, so that 0.1 is 0.1 as a Python float
        zero = torch.zeros_like(guide.site_posterior(site)[0], dtype=torch.float64)
        hyper[site] = biject_to(guide.site_support(site))(zero)
    scales = {}
    with torch.no_grad():
        for layer in model.layers:
            scale = layer_scale(model, layer.on(layer.device, torch.float64), hyper)
            scales[layer.site] = float(scale.square().mean().sqrt())
    return scales


def param_groups(model, guide, lr: float, units: str) -> list[dict]:
    """The optimiser's parameter groups for ``units``: one group at ``lr`` (latent units, the guide's and the
    model's deterministic parameters in the order training always took them), or, in weight units, one group
    per weight latent's loc at ``lr / s`` (``lr_scale`` 1/s, which :func:`scale_eps` reads) and the rest at lr.
    """
    check_units(units)
    everything = [*guide.parameters(), *model.deterministic_parameters()]
    if units == "latent":
        return [{"params": everything, "lr": lr}]
    check_guide(guide, type(guide).__name__)
    groups, own = [], set()
    for site, s in weight_scales(model, guide).items():
        loc = guide.loc_parameter(site)
        groups.append({"params": [loc], "lr": lr / s, "lr_scale": 1 / s})
        own.add(id(loc))
    rest = [p for p in everything if id(p) not in own]
    return [*groups, {"params": rest, "lr": lr, "lr_scale": 1.0}]


def scale_eps(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Divide each group's ``eps`` by its ``lr_scale`` (``eps * s``), so that its step is Adam's on ``s * z``
    exactly; returns the optimiser. (AdaBelief adds its eps, 1e-16, to its second moment too, where exactness
    would need ``eps * s^2``: a relative difference of about ``eps / (g - m)^2``, below float32's rounding for
    gradients of any ordinary size.)"""
    for group in optimizer.param_groups:
        if "eps" in group and group.get("lr_scale", 1.0) != 1.0:
            group["eps"] = group["eps"] / group["lr_scale"]
    return optimizer


def make_optimizer(model, guide, lr: float, units: str = "weight", optimizer: str = "adam"):
    """The optimiser ``pyrozoo train`` trains a guide with (a name in pyrozoo.optim.OPTIMIZERS), over the guide's
    and the model's deterministic parameters, ``lr`` in ``units``."""
    return scale_eps(OPTIMIZERS[optimizer](param_groups(model, guide, lr, units), lr=lr))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the run's learning rate ``lr`` (in the run's units) in every group."""
    for group in optimizer.param_groups:
        if "lr" in group:
            group["lr"] = lr * group.get("lr_scale", 1.0)
