"""The traceless -ELBO of the mean-field guide over the flat prior against Pyro's TraceMeanField_ELBO: the same
value and gradients from the same seed, and the traced path wherever the case is another."""

import functools

import pyro
import pytest
import torch
from pyro.infer import TraceMeanField_ELBO

from pyrozoo.elbo import negative_elbo
from pyrozoo.fast_elbo import fast_negative_elbo
from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.models.priors import flat, tiered
from pyrozoo.nets import create_net


def _lenet(prior=flat, dtype=torch.float32):
    net = create_net("lenet", in_channels=1, image_size=32, num_classes=10, channels=(2, 3, 4), hidden=5)
    return BayesianModel(net.to(dtype), prior=prior)


def _against_pyro(model, guide, x, y, size, seed=5):
    # float32 sums the terms in another order than Pyro: its rounding, times the data scale, reaches 2e-5
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if x.dtype == torch.float32 else {}
    params = list(guide.parameters())
    with pyro.validation_enabled(False):
        pyro.set_rng_seed(seed)
        ours = fast_negative_elbo(model, guide, x, y, size)
        assert ours is not None  # the fast path was taken
        ours_grad = torch.autograd.grad(ours, params)
        pyro.set_rng_seed(seed)
        theirs = TraceMeanField_ELBO().differentiable_loss(model, guide, x, y, size)
        theirs_grad = torch.autograd.grad(theirs, params)
    torch.testing.assert_close(ours, theirs, **tolerance)
    for a, b in zip(ours_grad, theirs_grad):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_value_and_gradients_as_pyro_with_pruned_weights(dtype):
    model = _lenet(functools.partial(flat, hidden_scale=0.3), dtype)
    layer = model.layers[1]
    model.set_mask(layer.name, torch.rand(layer.shape, generator=torch.Generator().manual_seed(0)) < 0.6)
    guide = make_guide("meanfield", model)
    with torch.no_grad():  # scales far apart, so that a slip in the softplus or KL derivative shows
        for raw in guide.raw_scales.values():
            raw.uniform_(-3, 1)
    x, y = torch.randn(4, 1, 32, 32, dtype=dtype), torch.randint(0, 10, (4,))
    _against_pyro(model, guide, x, y, 600)
    _against_pyro(model, guide, x, y, None)  # no dataset size: the minibatch unscaled


def test_mlp_with_batchnorm_trains_the_same_way(tiny_mlp_model, tiny_batch):
    """A step of svi from the same seed moves every parameter as the traced path does."""
    from pyrozoo.steps import svi_step

    x, y = tiny_batch
    twin = BayesianModel(tiny_mlp_model.net)
    guides = [make_guide("meanfield", m) for m in (tiny_mlp_model, twin)]
    guides[1].load_state_dict(guides[0].state_dict())
    for model, guide, fast in ((tiny_mlp_model, guides[0], True), (twin, guides[1], False)):
        optimizer = torch.optim.Adam(guide.parameters(), lr=0.01)
        pyro.set_rng_seed(1)
        with pyro.validation_enabled(not fast):  # checks on: the traced path
            loss = negative_elbo(model, guide, x, y, 60)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for a, b in zip(guides[0].parameters(), guides[1].parameters()):
        torch.testing.assert_close(a, b)
    assert svi_step(tiny_mlp_model, guides[0], torch.optim.Adam(guides[0].parameters()), x, y, 60) > 0


def test_other_cases_take_the_traced_path(tiny_mlp_model, tiny_batch):
    x, y = tiny_batch
    guide = make_guide("meanfield", tiny_mlp_model)
    with pyro.validation_enabled(False):
        assert fast_negative_elbo(tiny_mlp_model, guide, x, y, 60) is not None
        assert fast_negative_elbo(tiny_mlp_model, guide, x, None, 60) is None  # no labels
        assert (
            fast_negative_elbo(tiny_mlp_model, make_guide("autonormal", tiny_mlp_model, x, y, 60), x, y)
            is None
        )
        horseshoe = BayesianModel(tiny_mlp_model.net, prior=tiered)
        assert fast_negative_elbo(horseshoe, make_guide("meanfield", horseshoe), x, y, 60) is None
        other = BayesianModel(tiny_mlp_model.net, prior=functools.partial(flat, hidden_scale=0.2, extra=1))
        assert fast_negative_elbo(other, guide, x, y, 60) is None
        bad = BayesianModel(tiny_mlp_model.net, prior=functools.partial(flat, hidden_scale=-1.0))
        assert fast_negative_elbo(bad, make_guide("meanfield", tiny_mlp_model), x, y, 60) is None
        with pyro.poutine.scale(scale=2.0):  # a handler the traced path would honour
            assert fast_negative_elbo(tiny_mlp_model, guide, x, y, 60) is None
    with pyro.validation_enabled(True):  # Pyro's argument checks: the traced path, which runs them
        assert fast_negative_elbo(tiny_mlp_model, guide, x, y, 60) is None
