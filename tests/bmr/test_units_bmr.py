"""Structured BMR (whole units): the unit's dF, which units go, and that the rebuilt net agrees."""

import pytest
import torch

from pyrozoo.bmr import prune_units, rebuild, reduce
from pyrozoo.bmr.delta_f import multivariate
from pyrozoo.bmr.scores import delta_f
from pyrozoo.bmr.units import model_units
from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.nets import create_net


def _model_and_guide(seed=0):
    torch.manual_seed(seed)
    model = BayesianModel(create_net("mlp", in_channels=1, image_size=3, num_classes=3, hidden=(6, 5)))
    guide = make_guide("meanfield", model)
    return model, guide


def _set_posterior(guide, site, loc, scale):
    guide.write_posterior(site, loc, scale)


@torch.no_grad()
def test_a_units_gain_is_the_joint_evidence_gain_of_removing_all_its_entries():
    model, guide = _model_and_guide()
    for layer in model.layers:  # posteriors near the prior, so that some units are worth removing
        shape = layer.shape
        _set_posterior(guide, layer.site, 0.8 * torch.randn(shape), 0.3 + 0.7 * torch.rand(shape))
    first = model_units(model)[0]
    producer, consumer = first.producers[0].layer, first.consumers[0].layer
    assert (producer, consumer) == ("body.1", "body.3")
    posterior = guide.posterior()
    sites = {layer.name: layer.site for layer in model.layers}
    # Independently: the multivariate closed form over the unit's entries jointly (diagonal precision, every
    # entry reduced to a point mass), unit by unit: row u of the producer, column u of the consumer.
    expected = []
    for unit in range(first.count):
        locs, precisions = [], []
        for name, index in ((producer, (unit, slice(None))), (consumer, (slice(None), unit))):
            loc, scale = posterior[sites[name]]
            locs.append(loc[index].flatten().double())
            precisions.append(scale[index].flatten().double().pow(-2))
        mu, pi = torch.cat(locs), torch.cat(precisions)
        expected.append(multivariate(mu, torch.diag(pi), 1.0, torch.zeros_like(mu)).delta_f)
    expected = torch.stack(expected)
    gains = delta_f(model, guide, first.layers)
    got = first.total(gains)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    report = prune_units(model, guide)
    removed = ~model.mask(producer).bool().any(dim=1)
    assert torch.equal(removed, expected > 0)
    assert report.layers[0].note == (f"{int(removed.sum())} of 6 live units removed" if removed.any() else "")


@torch.no_grad()
def test_only_units_whose_removal_raises_the_evidence_go_and_the_rebuilt_net_agrees():
    model, guide = _model_and_guide()
    first, second, head = model.layers
    for layer in model.layers:  # every weight carries signal: far from 0, narrow
        _set_posterior(guide, layer.site, torch.full(layer.shape, 3.0), torch.full(layer.shape, 0.05))
    # unit 2 of the first hidden layer: its inputs, bias and outgoing weights all near 0 and broad
    loc = guide.posterior()[first.site][0].clone()
    loc[2] = 0.01
    _set_posterior(
        guide, first.site, loc, torch.where(torch.arange(6)[:, None] == 2, 0.9, 0.05).expand(6, 10)
    )
    loc = guide.posterior()[second.site][0].clone()
    loc[:, 2] = 0.01
    scale = torch.full(second.shape, 0.05)
    scale[:, 2] = 0.9
    _set_posterior(guide, second.site, loc, scale)
    x = torch.randn(4, 1, 3, 3)
    report = reduce(model, guide, "units")
    # a layer that lost none says nothing (a units pass runs after every epoch of a BMR run)
    assert [r.note for r in report.layers] == ["1 of 6 live units removed", ""]
    assert not model.mask(first.name)[2].any() and not model.mask(second.name)[:, 2].any()
    assert model.mask(first.name).sum() == 5 * 10 and model.mask(head.name).all()
    expected = model.logits(x, model.weights_from(guide.mean()))
    net = rebuild(model, guide)
    assert net.body[1].out_features == 5 and net.body[3].in_features == 5
    torch.testing.assert_close(net(x), expected)


@pytest.mark.parametrize("name", ["vit", "lenet"])
def test_units_rule_runs_on_every_structure_and_masks_only_shrink(name):
    side = 16 if name == "vit" else 32
    options = {"preset": "tiny"} if name == "vit" else {"channels": (3, 4, 5), "hidden": 6}
    model = BayesianModel(create_net(name, in_channels=1, image_size=side, num_classes=4, **options))
    guide = make_guide("meanfield", model)
    before = {layer.name: model.mask(layer.name).clone() for layer in model.layers}
    report = reduce(model, guide, "units", margin=-1e9, allow_empty=True)  # every live unit goes
    assert len(report.layers) == len(model_units(model))
    for layer in model.layers:
        assert bool((model.mask(layer.name) <= before[layer.name]).all())
    masks = {layer.name: model.mask(layer.name).bool() for layer in model.layers}
    for units in model_units(model):
        assert units.unused(masks).all() and units.dead(masks).all()


def test_a_per_weight_pass_can_be_followed_by_a_structured_one():
    model, guide = _model_and_guide()
    with torch.no_grad():
        for layer in model.layers:  # near the prior: a per-weight pass prunes some, the unit pass more
            _set_posterior(guide, layer.site, 0.5 * torch.randn(layer.shape), torch.full(layer.shape, 0.7))
    twin_model, twin_guide = _model_and_guide()
    twin_model.load_state_dict(model.state_dict())
    twin_guide.load_state_dict(guide.state_dict())
    plain = reduce(twin_model, twin_guide, "threshold")
    both = reduce(model, guide, "threshold", units=True)
    assert len(both.layers) == len(plain.layers) + len(model_units(model))
    assert both.pruned_fraction > plain.pruned_fraction
    assert any("units removed" in r.note and not r.note.startswith("0 of") for r in both.layers)


def test_a_per_channel_prelu_is_sliced_with_its_units():
    """A PReLU with one slope per channel passes the units through (its slopes are cut with them); the group is
    not fixed (a regression of this session's change to how pass-through modules are marked)."""
    from pyrozoo.bmr.units import structure

    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.PReLU(8), torch.nn.Linear(8, 2))
    model = BayesianModel(net, deterministic=["1"], example_input=torch.randn(2, 3))
    [units] = structure(model).units
    assert (units.name, units.count, units.passthrough, units.zero_preserving) == ("0", 8, ("1",), False)
