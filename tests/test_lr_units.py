"""pyrozoo.lr_units: a learning rate in weight units is Adam on the weights' scale ``s * z``, exactly; in latent
units the optimiser is the one training always built; the option is checked."""

import dataclasses

import pyro
import pytest
import torch
from torch import nn

from pyrozoo.bind import bind
from pyrozoo.build import build
from pyrozoo.config import TrainConfig
from pyrozoo.elbo import negative_elbo
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import make_guide
from pyrozoo.lr_units import set_lr, weight_scales
from pyrozoo.models import BayesianModel
from pyrozoo.steps import STEPS


def _conv_model() -> BayesianModel:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 4), nn.Tanh(),
                        nn.Linear(4, 3))  # fmt: skip
    return BayesianModel(net)


def _loss(model, guide, x, y, step: int) -> torch.Tensor:
    pyro.set_rng_seed(100 + step)  # the same draws for both optimisers at each step
    return negative_elbo(model, guide, x, y, 50)


@pytest.mark.parametrize("kind", ["meanfield", "autonormal", "autodelta"])
def test_a_step_in_weight_units_is_adam_on_the_weights_scale(float64, kind):
    model = _conv_model()
    guide = make_guide(kind, model)
    x, y = torch.randn(6, 1, 5, 5), torch.randint(0, 3, (6,))
    scales = weight_scales(model, guide)
    assert scales == {"0.weight_base": 0.1, "3.weight_base": 0.1, "5.weight_base": 1.0}  # flat prior at 1
    lr = 3e-3
    optimizer = STEPS["svi"].optimizer(model, guide, lr, "adam", 50, "weight")
    # the reference: torch's plain Adam at lr on u = s * z for each weight latent's loc, z's own for the rest
    twin = make_guide(kind, model)
    twin.load_state_dict(guide.state_dict())
    u = {site: (s * twin.loc_parameter(site)).detach().requires_grad_() for site, s in scales.items()}
    rest = [p for p in twin.parameters() if all(p is not twin.loc_parameter(site) for site in scales)]
    reference = torch.optim.Adam([*u.values(), *rest], lr=lr, foreach=False, fused=False)
    for step in range(5):
        optimizer.zero_grad()
        _loss(model, guide, x, y, step).backward()
        optimizer.step()
        with torch.no_grad():
            for site, s in scales.items():
                twin.loc_parameter(site).copy_(u[site] / s)
        reference.zero_grad()
        twin.zero_grad()
        _loss(model, twin, x, y, step).backward()
        for site, s in scales.items():
            u[site].grad = twin.loc_parameter(site).grad / s  # dL/du = dL/dz / s
        reference.step()
    moved = False
    for site, s in scales.items():
        ours = guide.loc_parameter(site).detach()
        torch.testing.assert_close(ours * s, u[site].detach(), rtol=1e-12, atol=1e-15)
        moved |= not torch.equal(ours, twin.loc_parameter(site))
    for ours, theirs in zip([p for p in guide.parameters()], twin.parameters()):
        if all(ours is not guide.loc_parameter(site) for site in scales):
            torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-12, atol=1e-15)
    assert moved  # the five steps moved the weights (else the comparison says nothing)


def test_latent_units_keep_the_one_group_training_always_built():
    model = _conv_model()
    guide = make_guide("meanfield", model)
    optimizer = STEPS["svi"].optimizer(model, guide, 1e-2, "adam", 50, "latent")
    (group,) = optimizer.param_groups
    assert group["lr"] == 1e-2 and group["eps"] == 1e-8
    assert [id(p) for p in group["params"]] == [id(p) for p in guide.parameters()]
    assert STEPS["svi"].optimizer(model, guide, 1e-2, "adam", 50).state_dict() == optimizer.state_dict()


def test_the_runs_lr_is_set_in_its_units():
    model = _conv_model()
    optimizer = STEPS["svi"].optimizer(model, make_guide("meanfield", model), 1e-3, "adam", 50, "weight")
    set_lr(optimizer, 2e-3)  # a resumed run's --override lr
    assert sorted({round(g["lr"], 12) for g in optimizer.param_groups}) == [2e-3, 2e-2]


def test_which_units_a_run_takes():
    def units(**kw):
        return bind(TrainConfig(net="mlp", data="fashion-mnist-mini", **kw)).config.lr_units

    assert units(method="flat-ff") == "weight"
    assert units(method="bmr-ss") == "latent"  # the reference code's lr (its fidelity runs)
    assert units(method="flat-ff", lr_units="latent") == "latent"
    assert units(method="bmr-ss", lr_units="weight") == "weight"
    assert units(method="flat-ff", guide="autonormal") == "weight"
    assert units(method="flat-map") == "latent"
    assert units(method="flat-map", lr_units="weight") == "weight"  # MAP's points, in weight units
    assert units(method="ivon") == "latent"  # IVON's own step
    with pytest.raises(PyrozooError, match="unknown --lr-units 'metres'; choose weight .* or latent"):
        units(lr_units="metres")
    with pytest.raises(PyrozooError, match="--lr-units weight needs a guide .* guide 'ivon' takes"):
        units(method="ivon", lr_units="weight")
    # a run recorded before the option existed trained in latent units, and resumes so
    stored = {k: v for k, v in dataclasses.asdict(TrainConfig(method="flat-ff")).items() if k != "lr_units"}
    assert TrainConfig.from_record(stored).lr_units == "latent"


def test_the_reference_fidelity_run_trains_as_before():
    """bmr-ss from the reference's initial draw (init_locs) keeps the one group at the reference's lr in z."""
    drawn = {"init_locs": {"features.0.precision": 1.5}}
    config = TrainConfig(net="lenet", data="fashion-mnist-mini", method="bmr-ss", guide_options=drawn)
    setup = build(config, log=lambda text: None)
    (group,) = setup.optimizer.param_groups
    assert setup.config.lr_units == "latent" and group["lr"] == 1e-2 and group["eps"] == 1e-8
    assert [id(p) for p in group["params"]] == [id(p) for p in setup.guide.parameters()]
