import math

import pytest
import torch

from pyrozoo.bmr import prune, pruned_fraction
from pyrozoo.bmr.rebuild import parameter_count, rebuild
from pyrozoo.bmr.scores import delta_f
from pyrozoo.bmr.units import effective_masks
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.nets import create_net


def _set_posterior(guide, site, loc, scale):
    guide.write_posterior(site, loc, scale)


def test_delta_f_reads_the_guide_posterior(tiny_mlp_model):
    guide = make_guide("meanfield", tiny_mlp_model)
    layer = tiny_mlp_model.layers[0]
    loc = torch.linspace(-2, 2, layer.shape.numel()).reshape(layer.shape)
    scale = torch.full(layer.shape, 0.5)
    _set_posterior(guide, layer.site, loc, scale)
    gains = delta_f(tiny_mlp_model, guide)
    assert set(gains) == {layer.name for layer in tiny_mlp_model.layers if layer.prunable}
    # log Savage-Dickey ratio for prior N(0, 1), posterior N(loc, 0.25): 1/2 ln(4) - 1/2 * 4 loc^2
    torch.testing.assert_close(gains[layer.name], 0.5 * math.log(4.0) - 2 * loc**2)


def test_prune_masks_follow_the_rule_and_never_come_back(tiny_mlp_model):
    guide = make_guide("meanfield", tiny_mlp_model)
    layer = tiny_mlp_model.layers[0]
    loc = torch.zeros(layer.shape)
    loc[:, :3] = 3.0  # far from zero with scale 0.1: clearly kept
    _set_posterior(guide, layer.site, loc, torch.full(layer.shape, 0.1))
    report = prune(tiny_mlp_model, guide, "threshold")
    keep = tiny_mlp_model.mask(layer.name).bool()
    assert keep[:, :3].all() and not keep[:, 3:].any()
    assert report.layers[0].kept == 3 * layer.shape[0] and report.layers[0].live_before == layer.shape.numel()
    # the pruned entries of the guide are back at the prior N(0, 1)
    pruned_loc, pruned_scale = guide.posterior()[layer.site]
    assert torch.all(pruned_loc[~keep] == 0)
    torch.testing.assert_close(pruned_scale[~keep], torch.ones(int((~keep).sum())))
    # a later posterior that would favour the pruned weights cannot revive them
    _set_posterior(guide, layer.site, torch.full(layer.shape, 5.0), torch.full(layer.shape, 0.1))
    prune(tiny_mlp_model, guide, "spike-and-slab")
    assert torch.equal(tiny_mlp_model.mask(layer.name).bool(), keep)
    assert not any(r.layer == "head" for r in report.layers)  # the output layer is never pruned


def test_map_guide_cannot_be_pruned(tiny_mlp_model, tiny_batch):
    guide = make_guide("autodelta", tiny_mlp_model, *tiny_batch, 60)
    with pytest.raises(PyrozooError, match="point mass"):
        prune(tiny_mlp_model, guide)


def _mlp_with_dead_units():
    model = BayesianModel(create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(6, 5)))
    first, second, head = model.layers
    keep = torch.ones(first.shape, dtype=torch.bool)
    keep[1] = False  # unit 1 of the first hidden layer: every input and its bias pruned -> dead
    model.set_mask(first.name, keep)
    keep = torch.ones(second.shape, dtype=torch.bool)
    keep[:, 4] = False  # unit 4 of the first layer: every outgoing weight pruned -> unused
    keep[2] = False  # unit 2 of the second layer: dead
    model.set_mask(second.name, keep)
    return model


def test_pruned_fraction_counts_weights_downstream_of_dead_units():
    model = _mlp_with_dead_units()
    masks = effective_masks(model)
    assert not masks["body.3"][:, 1].any()  # outgoing weights of dead unit 1 count as pruned
    assert not masks["body.1"][4].any()  # so do the incoming weights of unused unit 4
    assert (
        not masks["head"][:, 2].any() and masks["head"][:, :2].all()
    )  # and the head's inputs from dead unit 2
    # prunable entries: 6 x 17 + 5 x 7 = 137; pruned: rows 1 and 4 of layer 1 (34), in layer 2 columns 1 and 4
    # (10) and row 2 (7) minus their overlaps (2): 34 + 10 + 7 - 2 = 49 (the head is not prunable)
    assert pruned_fraction(model) == pytest.approx(49 / 137)


@pytest.mark.parametrize("net_name", ["mlp", "lenet"])
def test_rebuilt_net_matches_the_model_at_posterior_means_and_shrinks(net_name):
    torch.manual_seed(1)
    side = 32 if net_name == "lenet" else 8
    options = {"channels": (4, 5, 6), "hidden": 7} if net_name == "lenet" else {"hidden": (9, 8)}
    model = BayesianModel(create_net(net_name, in_channels=1, image_size=side, num_classes=4, **options))
    guide = make_guide("meanfield", model)
    for layer in model.layers[:-1]:  # prune at random, and kill whole units/channels
        keep = torch.rand(layer.shape) > 0.4
        keep[0] = False
        keep[:, 1] = False
        model.set_mask(layer.name, keep)
    x = torch.randn(5, 1, side, side)
    expected = model.logits(x, model.weights_from(guide.mean()))
    dense = rebuild(model, guide, remove_dead=False)
    sparse = rebuild(model, guide, remove_dead=True)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), expected)
        torch.testing.assert_close(sparse(x), expected, rtol=1e-5, atol=1e-5)
    assert parameter_count(sparse) < parameter_count(dense)
    # the zeros in the dense net are exactly the pruned entries
    first = model.layers[0]
    weight = dense.get_parameter(f"{first.name}.weight").reshape(first.shape[0], -1)
    assert torch.equal(weight != 0, model.mask(first.name).bool()[:, :-1])


def test_posterior_mean_of_the_layer_scale_is_log_normal(tiny_mlp_model):
    guide = make_guide("meanfield", tiny_mlp_model)
    site = f"{tiny_mlp_model.layers[0].name}.precision"
    loc, scale = guide.posterior()[site]
    torch.testing.assert_close(guide.mean()[site], torch.exp(loc + scale**2 / 2))


def test_rebuild_of_a_fully_pruned_net_keeps_one_unit_per_layer():
    model = BayesianModel(create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(6, 5)))
    for layer in model.layers[:-1]:
        model.set_mask(layer.name, torch.zeros(layer.shape, dtype=torch.bool))
    guide = make_guide("meanfield", model)
    sparse = rebuild(model, guide)
    assert [m.out_features for m in sparse.modules() if isinstance(m, torch.nn.Linear)] == [1, 1, 3]
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model.logits(x, model.weights_from(guide.mean())))
