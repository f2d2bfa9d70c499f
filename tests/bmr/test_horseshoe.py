import torch

from pyrozoo.bmr.horseshoe import prune_horseshoe
from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.nets import create_net


def _model_and_guide():
    torch.manual_seed(0)
    model = BayesianModel(create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(6, 4)))
    guide = make_guide("meanfield", model)
    return model, guide


def _set(guide, site, loc, scale):
    guide.write_posterior(site, loc, scale)


def test_recovers_which_rows_are_zero_and_which_carry_signal():
    model, guide = _model_and_guide()
    first, second = model.layers[0], model.layers[1]
    loc = torch.zeros(first.shape)
    signs = torch.randint(0, 2, (3, first.shape[1])) * 2 - 1
    loc[:3] = 3.0 * signs  # rows 0-2: weights far from zero; rows 3-5: known to be zero
    _set(guide, first.site, loc, torch.full(first.shape, 0.01))
    _set(guide, second.site, torch.full(second.shape, 2.0), torch.full(second.shape, 0.01))  # all signal
    report = prune_horseshoe(model, guide, steps=600, delta=1e-3)
    mask = model.mask(first.name)
    assert torch.all(mask[3:] == 0), mask
    assert torch.all(mask[:3] > 0.5), mask
    assert torch.all(model.mask(second.name) > 0.5)
    # surviving weights keep (almost exactly) their posterior in the rescaled parametrisation
    new_loc, new_scale = guide.posterior()[first.site]
    torch.testing.assert_close(new_loc[:3] * mask[:3], loc[:3], rtol=1e-2, atol=1e-2)
    # pruned entries are back at the prior
    assert torch.all(new_loc[3:] == 0) and torch.allclose(new_scale[3:], torch.ones(3, first.shape[1]))
    assert report.layers[0].kept == 3 * first.shape[1] and not report.layers[0].note


def test_guards_against_collapse():
    model, guide = _model_and_guide()
    first = model.layers[0]
    _set(
        guide, first.site, torch.zeros(first.shape), torch.full(first.shape, 0.01)
    )  # every row looks prunable
    report = prune_horseshoe(model, guide, steps=300, delta=0.5)
    assert "collapse guarded" in report.layers[0].note
    assert torch.all(model.mask(first.name) == 1)


def test_training_randomness_is_untouched():
    model, guide = _model_and_guide()
    state = torch.get_rng_state()
    prune_horseshoe(model, guide, steps=5)
    assert torch.equal(torch.get_rng_state(), state)
