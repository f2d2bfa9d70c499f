import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyrozoo.elbo import negative_elbo
from pyrozoo.guides import make_guide


def _assert_same_loss_and_gradients(reference, model, guide, x, y, seed: int, size: int = 60) -> None:
    """pyrozoo's negative ELBO and Pyro's ``reference`` loss, from the same random draws: equal values and
    equal gradients in every guide parameter."""
    params = list(guide.parameters())
    pyro.set_rng_seed(seed)
    ours = negative_elbo(model, guide, x, y, size)
    ours_grad = torch.autograd.grad(ours, params)
    pyro.set_rng_seed(seed)
    theirs = reference.differentiable_loss(model, guide, x, y, size)
    theirs_grad = torch.autograd.grad(theirs, params)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(ours_grad, theirs_grad):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kind, reference",
    [("meanfield", TraceMeanField_ELBO), ("autonormal", TraceMeanField_ELBO), ("autodelta", Trace_ELBO)],
)
def test_same_value_and_gradient_as_pyro(kind, reference, tiny_mlp_model, tiny_batch):
    x, y = tiny_batch
    guide = make_guide(kind, tiny_mlp_model, x, y, 60)
    _assert_same_loss_and_gradients(reference(), tiny_mlp_model, guide, x, y, seed=3)


def test_meanfield_uses_the_analytic_kl(tiny_mlp_model):
    """With the likelihood and the layer scales left out, -ELBO is the weight latents' exact KL, with no
    sampling noise: negative_elbo takes the analytic KL where one exists (a Monte Carlo estimate would vary).
    """
    guide = make_guide("meanfield", tiny_mlp_model)
    scales = [name for name in guide.posterior() if not name.endswith("weight_base")]
    weights_only = pyro.poutine.block(tiny_mlp_model.sample_weights, hide=scales)
    values = set()
    for seed in range(3):
        pyro.set_rng_seed(seed)
        values.add(round(negative_elbo(weights_only, pyro.poutine.block(guide, hide=scales)).item(), 4))
    assert len(values) == 1
    posterior = guide.posterior()
    exact = sum(
        (0.5 * (s**2 + m**2 - 1) - s.log()).sum()
        for m, s in (posterior[layer.site] for layer in tiny_mlp_model.layers)
    )
    assert abs(values.pop() - exact.item()) < 1e-3


def test_minibatch_elbo_is_unbiased_for_the_full_data_elbo(tiny_mlp_model):
    """Averaged over a partition of the data into minibatches (same posterior draw), the scaled minibatch
    estimate equals the full-data ELBO exactly; so over random minibatches it is unbiased."""
    x, y = torch.randn(12, 1, 4, 4), torch.randint(0, 3, (12,))
    guide = make_guide("meanfield", tiny_mlp_model, x, y, 12)
    pyro.set_rng_seed(7)
    full = negative_elbo(tiny_mlp_model, guide, x, y, 12)
    batches = []
    for chunk in torch.arange(12).split(4):
        pyro.set_rng_seed(7)  # the guide runs first, so the same seed gives the same posterior draw
        batches.append(negative_elbo(tiny_mlp_model, guide, x[chunk], y[chunk], 12))
    torch.testing.assert_close(torch.stack(batches).mean(), full)
    pyro.set_rng_seed(7)
    unscaled = negative_elbo(tiny_mlp_model, guide, x[:4], y[:4], 4)
    assert not torch.isclose(unscaled, batches[0])  # the dataset size really enters the estimate


def test_summed_kl_to_the_weights_prior_is_the_sum_of_the_entrywise_kl():
    """The one-node summed KL against N(0, 1) has the entrywise form's value and gradients (float64, and by
    finite differences); scaled, masked or broadcast sites keep the entrywise path and its semantics."""
    from pyrozoo.elbo import _kl_sum, _SummedKLToStandardNormal
    from pyrozoo.models.bayesian import StandardNormal

    g = torch.Generator().manual_seed(0)
    loc = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(7, 5, generator=g, dtype=torch.float64).add(0.2).requires_grad_()
    entrywise = (0.5 * (scale**2 + loc**2 - 1) - scale.log()).sum()
    summed = _SummedKLToStandardNormal.apply(loc, scale)
    torch.testing.assert_close(summed, entrywise)
    for a, b in zip(torch.autograd.grad(summed, (loc, scale)), torch.autograd.grad(entrywise, (loc, scale))):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(_SummedKLToStandardNormal.apply, (loc, scale))

    prior = StandardNormal(loc.shape, dtype=torch.float64).to_event(2)
    q = pyro.distributions.Normal(loc, scale).to_event(2)
    mask = torch.rand(7, 5, generator=g) < 0.5
    site = {"fn": q, "scale": 0.5, "mask": None}
    torch.testing.assert_close(_kl_sum(site, prior), 0.5 * entrywise)
    q_rows = pyro.distributions.Normal(loc, scale).to_event(1)
    masked = {"fn": q_rows, "scale": 1.0, "mask": mask[:, 0]}
    prior_rows = StandardNormal(loc.shape, dtype=torch.float64).to_event(1)
    expected = (0.5 * (scale**2 + loc**2 - 1) - scale.log()).sum(-1)[mask[:, 0]].sum()
    torch.testing.assert_close(_kl_sum(masked, prior_rows), expected)
    # a guide of another shape than its prior: whatever the registered entrywise KL makes of it
    wide = StandardNormal(torch.Size((3, 7, 5)), dtype=torch.float64).to_event(2)
    expected = torch.distributions.kl_divergence(q, wide).sum()
    torch.testing.assert_close(_kl_sum({"fn": q, "scale": 1.0, "mask": None}, wide), expected)


def test_lenet_elbo_with_pruned_weights_matches_pyro(tiny_lenet_model):
    """A conv net with a partly pruned layer: value and gradients as Pyro's TraceMeanField_ELBO."""
    model = tiny_lenet_model
    layer = model.layers[1]
    keep = torch.rand(layer.shape) < 0.6
    model.set_mask(layer.name, keep)
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))
    guide = make_guide("meanfield", model)
    _assert_same_loss_and_gradients(TraceMeanField_ELBO(), model, guide, x, y, seed=5)
