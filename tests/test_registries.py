"""Contracts that every registered component meets, parametrised over the registries: a new reduction, prior,
method, optimiser or baseline is tested here without new test code (as Pyro's autoguide tests run over every
guide class)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pyrozoo.baselines import BASELINES
from pyrozoo.bind import bind
from pyrozoo.bmr import REDUCTIONS, Reduction, make_reduction, pruned_fraction
from pyrozoo.bmr.units import model_units
from pyrozoo.cli import main
from pyrozoo.config import TrainConfig
from pyrozoo.data import DATASETS
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import GUIDES, make_guide
from pyrozoo.methods import METHODS
from pyrozoo.models import BayesianModel
from pyrozoo.models.likelihoods import LIKELIHOODS
from pyrozoo.models.priors import PRIORS
from pyrozoo.nets import NETS, create_net
from pyrozoo.optim import OPTIMIZERS
from pyrozoo.options import bind_options
from pyrozoo.posteriors import POSTERIORS, FittedSource, make_source
from pyrozoo.registry import Registry, describe, option_defaults, option_names
from pyrozoo.shift import SHIFTS

REGISTRIES = [
    REDUCTIONS, PRIORS, METHODS, NETS, GUIDES, OPTIMIZERS, BASELINES, DATASETS, LIKELIHOODS, SHIFTS, POSTERIORS
]  # fmt: skip


@pytest.mark.parametrize("registry", REGISTRIES, ids=lambda r: r.kind)
def test_every_registry_names_what_it_knows_when_a_name_is_unknown(registry):
    assert isinstance(registry, Registry) and len(registry) > 0
    with pytest.raises(PyrozooError, match=f"unknown {registry.kind} 'qqqq'; known {registry.plural}: "):
        registry["qqqq"]
    first = next(iter(registry))  # a misspelling (one letter dropped) gets the name suggested
    with pytest.raises(PyrozooError, match=f"did you mean '{first}'"):
        registry[first[:-1] if len(first) > 3 else first + "x"]
    for name, text in registry.described():
        assert text and ":class:" not in text and "``" not in text, (name, text)


def _random_posterior(model):
    """A mean-field posterior in which some weights are clearly needed and others clearly not."""
    guide = make_guide("meanfield", model)
    generator = torch.Generator().manual_seed(1)
    for layer in model.layers:
        loc = torch.where(torch.rand(layer.shape, generator=generator) < 0.5, 0.0, 3.0)
        guide.write_posterior(layer.site, loc, torch.full(layer.shape, 0.2))
    return guide


def _masks(model):
    return {layer.name: model.mask(layer.name).bool().clone() for layer in model.layers}


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_every_reduction_is_one_object_whose_options_are_checked(name):
    reduction = make_reduction(name)  # every option has a default
    assert isinstance(reduction, Reduction) and reduction.name == name and dataclasses.is_dataclass(reduction)
    assert list(reduction.options()) == option_names(REDUCTIONS[name])
    assert reduction.describe().startswith(f"{name}(")
    takes = ", ".join(option_names(REDUCTIONS[name])) or "none"
    with pytest.raises(
        PyrozooError, match=f"reduction '{name}' takes no option 'bogus'; its options: {takes}$"
    ):
        make_reduction(name, bogus=1)


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_every_reduction_only_removes_writes_back_the_prior_and_reports_what_it_did(name):
    model = BayesianModel(create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(6, 5)))
    guide = _random_posterior(model)
    first = model.layers[0]
    keep = torch.ones(first.shape, dtype=torch.bool)
    keep[0] = False  # already pruned before the pass
    model.set_mask(first.name, keep)
    before = _masks(model)
    old_posterior = guide.posterior()
    reduction = make_reduction(name)
    report = reduction(model, guide)
    after = _masks(model)
    assert all(not (after[k] & ~before[k]).any() for k in before), "a pruned entry came back"
    assert report.pruned_fraction == pytest.approx(pruned_fraction(model))
    assert not after[model.layers[-1].name].logical_not().any(), "the output layer lost weights"
    posterior = guide.posterior()
    for layer in model.layers:
        loc, scale = posterior[layer.site]
        pruned = before[layer.name] & ~after[layer.name]  # by this pass
        if reduction.resets_pruned:  # to the prior N(0, 1)
            assert torch.all(loc[pruned] == 0) and torch.allclose(scale[pruned], torch.ones(())), layer.name
        else:  # as they were
            old_loc, old_scale = old_posterior[layer.site]
            assert torch.equal(loc[pruned], old_loc[pruned]) and torch.equal(scale[pruned], old_scale[pruned])
    again = reduction(model, guide)
    assert all(not (model.mask(k).bool() & ~after[k]).any() for k in after)
    assert again.pruned_fraction >= report.pruned_fraction - 1e-12


def test_reductions_compose_into_one_value():
    model = BayesianModel(create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(6, 5)))
    guide = _random_posterior(model)
    both = make_reduction("threshold").then(make_reduction("units"))
    assert both.describe() == "threshold(margin=0.0) then units(margin=0.0)"
    report = both(model, guide)
    assert len(report.layers) == 2 + len(model_units(model))
    assert report.pruned_fraction == pytest.approx(pruned_fraction(model))


@pytest.mark.parametrize("name", list(REDUCTIONS))
def test_the_prune_command_refuses_an_option_its_reduction_does_not_take(capsys, name):
    code = main(["prune", "no-such-run", "--rule", name, "--rule-option", "bogus=1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "takes no option 'bogus'" in err, err


@pytest.mark.parametrize("name", list(PRIORS))
def test_every_prior_draws_a_scale_for_every_layer_and_binds_its_options(name, tiny_mlp_model):
    prior = PRIORS[name]
    model = BayesianModel(tiny_mlp_model.net, prior=prior)
    weights = model.sample_weights()
    assert set(weights) == {layer.name for layer in model.layers}
    assert all(
        torch.isfinite(w).all() and w.shape == layer.shape for layer, w in zip(model.layers, weights.values())
    )
    defaults = option_defaults(prior)
    assert bind_options(f"prior {name}", prior, defaults) == defaults
    with pytest.raises(PyrozooError, match="takes no option 'bogus'"):
        bind_options(f"prior {name}", prior, {"bogus": 1})


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_is_a_resolvable_recipe_of_registered_parts(name):
    method = METHODS[name]
    assert method.guide in GUIDES and method.optimizer in OPTIMIZERS and method.prior in PRIORS.values()
    assert method.reduction is None or type(method.reduction) in REDUCTIONS.values()
    config = bind(TrainConfig(method=name)).config
    assert (config.guide, config.lr, config.optimizer) == (method.guide, method.lr, method.optimizer)
    assert describe(method)


@pytest.mark.parametrize("name", list(POSTERIORS))
def test_every_posterior_source_gives_bmr_a_posterior_or_says_why_not(name, trained_map_run):
    """On a MAP run (a point estimate): a source fits a posterior with spread whose dF covers every prunable
    layer, or says why it cannot; its pruned file is its own, and named so that ``export --pruned`` can
    tell it from its other choices."""
    from pyrozoo.bmr.scores import delta_f
    from pyrozoo.train import Run

    run = Run.open(trained_map_run, log=lambda text: None)
    source = make_source(name, fit_size=100)
    files = [make_source(other).file for other in POSTERIORS]
    assert files.count(source.file) == 1 and name not in ("latest", "none")
    why = source.unavailable(run)
    if why is not None:
        assert "spread" in why and not isinstance(source, FittedSource)
        return
    model, posterior = source.fit(run, progress=False)
    assert not posterior.point_mass
    scores = delta_f(model, posterior)
    assert set(scores) == {layer.name for layer in model.layers if layer.prunable}
    assert all(torch.isfinite(s).all() for s in scores.values())
