"""Tests for pyrozoo.build: the Setup's parts are made from one Bound and agree with one another."""

from __future__ import annotations

import pytest
import torch
from configs import tiny_config

import pyrozoo.build
from pyrozoo.bind import bind
from pyrozoo.build import Setup, build
from pyrozoo.errors import PyrozooError


@pytest.mark.parametrize("method", ["bmr-th", "flat-map"])
def test_the_setups_model_guide_and_optimizer_agree(method):
    setup = build(tiny_config(method=method, net_options={"hidden": (7,)}))
    assert isinstance(setup, Setup) and setup.config.net_options == {"hidden": (7,)}
    layers = {layer.name: layer for layer in setup.model.layers}
    assert list(layers) == ["body.1", "head"]
    assert layers["body.1"].weight_shape == (7, 28 * 28) and layers["head"].weight_shape == (10, 7)
    # the guide has a posterior for each layer's weights (and bias column), of the model's shape
    posterior = setup.guide.posterior()
    weights = {s.removesuffix(".weight_base"): m.shape for s, (m, _) in posterior.items() if "weight" in s}
    assert weights == setup.model.full_shapes and list(weights) == list(layers)
    # the optimiser trains exactly the guide's parameters
    optimised = {id(p) for group in setup.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in setup.guide.parameters()}
    assert all(group["lr"] == setup.config.lr for group in setup.optimizer.param_groups)


def test_a_bound_is_built_as_it_is_without_binding_again(monkeypatch):
    bound = bind(tiny_config(method="bmr-th", prior_options={"hidden_scale": 2.0}))

    def again(config):
        raise AssertionError("build bound the options a second time")

    monkeypatch.setattr(pyrozoo.build, "bind", again)
    setup = build(bound)
    assert setup.bound.prior is bound.prior and setup.model.prior is bound.prior
    assert setup.bound.reduction is bound.reduction and setup.step is bound.step


def test_the_same_config_builds_the_same_start_and_the_seed_changes_it():
    def start(seed: int) -> dict:
        return {k: v.clone() for k, v in build(tiny_config(seed=seed)).guide.state_dict().items()}

    first, again, other = start(0), start(0), start(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_a_batch_larger_than_the_training_set_is_refused():
    with pytest.raises(PyrozooError, match="--batch-size 100000 is larger than the training set"):
        build(tiny_config(batch_size=100000))
