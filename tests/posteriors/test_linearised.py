"""The linearised (GLM) predictive of Laplace posteriors, against an explicit Jacobian and a dense covariance in
float64; the Laplace evidence's noise precision."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import pyrozoo
from pyrozoo.errors import PyrozooError
from pyrozoo.models.likelihoods import Gaussian
from pyrozoo.posteriors.laplace import laplace, noise_precision, prior_precision
from pyrozoo.posteriors.linearised import linearised_outputs
from pyrozoo.predict import _draws


def _tiny(kind: str, outputs: int) -> nn.Module:
    torch.manual_seed(1)
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, outputs))
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8, outputs)
    )


def _fitted(kind: str, structure: str, task: str, masked: bool):
    """A Laplace posterior of a tiny net (classifier of 3 classes, or regressor), some entries pruned."""
    net = _tiny(kind, 3 if task == "classify" else 1).double()
    x = torch.randn(30, 1, 4, 4, dtype=torch.float64)
    options = {"likelihood": Gaussian("fixed", 4.0).double()} if task == "regress" else {}
    model, posterior = laplace(net, x, structure, progress=False, fisher="type-2", **options)
    if masked:
        g = torch.Generator().manual_seed(3)
        for layer in model.layers:
            model.set_mask(layer.name, (torch.rand(layer.shape, generator=g) > 0.3).double())
    return net, model, posterior, x[:4]


def _reference(net, model, posterior, x):
    """``f(x; θ*)``, the explicit Jacobian ``J`` in the layers' joined ``[W | b]`` (masked entries zeroed) and
    the dense weight covariance ``Σ`` (block-diagonal; a masked entry's row and column zero), from the
    posterior's factors and scales, not from its sampler."""
    thetas, blocks, masks = [], [], []
    for layer in model.layers:
        s = model.prior.scales[layer.name]
        mask = model.mask(layer.name).flatten()
        loc, scale = posterior.site_posterior(layer.site)
        if layer.site in posterior.kron:
            k = posterior.kron[layer.site]
            cov = torch.linalg.inv(torch.kron(k.G, k.A) + torch.eye(loc.numel(), dtype=torch.float64))
        else:
            cov = torch.diag(scale.flatten().square())
        thetas.append(s * loc.flatten() * mask)
        blocks.append(s**2 * cov * torch.outer(mask, mask))
        masks.append(mask)
    theta, sigma = torch.cat(thetas), torch.block_diag(*blocks)

    def f(flat):
        params, i = {}, 0
        for layer in model.layers:
            module = net.get_submodule(layer.name)
            rows, cols = layer.shape
            m = flat[i : i + rows * cols].reshape(rows, cols)
            i += rows * cols
            params[f"{layer.name}.weight"] = m[:, :-1].reshape(module.weight.shape)
            params[f"{layer.name}.bias"] = m[:, -1]
        return torch.func.functional_call(net, params, (x,))

    jacobian = torch.autograd.functional.jacobian(f, theta)  # (N, C, P)
    return f(theta), jacobian, sigma, theta


CASES = [(k, s, t) for k in ("linear", "conv") for s in ("diag", "kron") for t in ("classify", "regress")]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("kind,structure,task", CASES)
def test_each_draw_is_the_net_plus_its_jacobian_times_the_offset(kind, structure, task, masked):
    """Draw by draw, the linearised output is ``f(x; θ*) + J (θ_s - θ*)`` with an explicit Jacobian, and a
    pruned entry's offset is 0."""
    net, model, posterior, x = _fitted(kind, structure, task, masked)
    mean, jacobian, _, theta = _reference(net, model, posterior, x)
    draws = list(_draws(model, posterior, 3, seed=5))
    outputs = list(linearised_outputs(model, posterior, x, draws))
    for (weights, _), (out, _) in zip(draws, outputs):
        drawn = torch.cat([weights[layer.name].flatten() for layer in model.layers])
        masks = torch.cat([model.mask(layer.name).flatten() for layer in model.layers])
        assert bool((drawn[masks == 0] == 0).all())  # the pruned entries stay at 0 in every draw
        torch.testing.assert_close(out, mean + jacobian @ (drawn - theta), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("kind,structure,task", CASES)
def test_the_glm_predictive_has_the_net_as_mean_and_j_sigma_j_as_covariance(kind, structure, task):
    """Over many draws, the linearised outputs' mean is ``f(x; θ*)`` and their covariance ``J Σ Jᵀ`` (Σ dense,
    masked); through pyrozoo.predict a regression's epistemic variance is its diagonal, its noise the model's.
    """
    net, model, posterior, x = _fitted(kind, structure, task, masked=True)
    mean, jacobian, sigma, _ = _reference(net, model, posterior, x)
    covariance = jacobian @ sigma @ jacobian.transpose(1, 2)  # (N, C, C)
    variance = torch.diagonal(covariance, dim1=1, dim2=2)
    assert float(variance.min()) > 0
    draws = 1500
    if task == "regress":
        out = pyrozoo.predict(model, posterior, x, samples=draws)
        assert torch.allclose(out["epistemic_std"] ** 2, variance[:, 0], rtol=0.15)
        assert torch.allclose(out["aleatoric_std"] ** 2, torch.full((4,), 0.25, dtype=torch.float64))
        assert bool(((out["mean"] - mean[:, 0]).abs() <= 5 * (variance[:, 0] / draws).sqrt()).all())
        return
    outputs = torch.stack(
        [out for out, _ in linearised_outputs(model, posterior, x, _draws(model, posterior, draws, seed=0))]
    )
    assert bool(((outputs.mean(0) - mean).abs() <= 5 * (variance / draws).sqrt()).all())
    centred = outputs - outputs.mean(0)
    empirical = torch.einsum("snc,snd->ncd", centred, centred) / draws
    scale = torch.sqrt(variance[:, :, None] * variance[:, None, :])
    assert bool(((empirical - covariance).abs() <= 0.15 * scale).all())


def test_a_reduced_kfac_posteriors_draws_are_conditioned_on_the_pruned_entries():
    """After a reduction, each KFAC draw is the full posterior's draw conditioned on the pruned entries being 0
    (KroneckerGaussian.conditional_mean of it: tests/bmr/test_kfac.py), not that draw masked; a restored state
    draws unconditioned again."""
    _, model, posterior, _ = _fitted("linear", "kron", "classify", masked=False)
    site = model.layers[0].site
    full = copy.deepcopy(posterior.state_dict())  # its dicts are the posterior's own
    pruned = torch.rand(posterior.loc[site].shape, generator=torch.Generator().manual_seed(2)) < 0.5
    posterior.reduce(site, pruned)
    reduced = copy.deepcopy(posterior.state_dict())

    def draw(state):
        posterior.load_state_dict(state)
        with torch.random.fork_rng():
            torch.manual_seed(7)
            return posterior()[site] - posterior.loc[site]

    offset, raw = draw(reduced), draw({**reduced, "pruned": {}})
    assert bool((offset[pruned] == 0).all()) and not bool((raw[pruned] == 0).all())
    want = posterior.kron[site].conditional_mean(pruned, of=raw)[0]
    torch.testing.assert_close(offset, want.to(offset))
    assert not torch.allclose(offset[~pruned], raw[~pruned])
    posterior.load_state_dict(full)
    assert posterior.pruned == {}


def test_glm_is_the_default_and_samples_the_option():
    net, model, posterior, x = _fitted("conv", "kron", "classify", masked=False)
    assert posterior.predictive == "glm"
    glm = pyrozoo.predict(model, posterior, x, samples=50)["probs"]
    mean = next(linearised_outputs(model, posterior, x, iter([(model.weights_from(posterior.loc), {})])))[0]
    assert torch.allclose(mean, net(x))  # at the posterior mean, the linearised net is the net
    posterior.predictive = "samples"
    sampled = pyrozoo.predict(model, posterior, x, samples=50)["probs"]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        want = torch.stack([model.logits(x, model.weights_from(posterior())).softmax(-1) for _ in range(50)])
    torch.testing.assert_close(sampled, want.mean(0))
    assert not torch.allclose(glm, sampled)
    with pytest.raises(PyrozooError, match="glm"):
        laplace(net, x, "diag", progress=False, predictive="linear")


def _evidence(beta, h, norms, error, n):
    """The Laplace log evidence of a Gaussian regression at noise precision ``beta``, each layer's prior
    precision at its optimum (``h``: each layer's GGN eigenvalues at unit noise precision)."""
    out = 0.5 * n * math.log(beta) - 0.5 * beta * error
    for name, unit in h.items():
        delta = prior_precision(unit * beta, norms[name])
        out += 0.5 * unit.numel() * math.log(delta) - 0.5 * delta * norms[name]
        out -= 0.5 * float((unit * beta + delta).log().sum())
    return out


def test_the_noise_precision_maximises_the_laplace_evidence(float64):
    """The fixed point ``β = (n - γ) / Σ r²`` is the evidence's maximum over β, each layer's δ at its own
    optimum; laplace() with the targets keeps that β and takes the curvature at it."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x = torch.randn(50, 3, 1, 1)
    y = net(x)[:, 0].detach() + 0.3 * torch.randn(50)
    error = float((net(x)[:, 0] - y).square().sum().detach())
    exact = {"likelihood": Gaussian("fixed", 1.0), "fisher": "type-2", "progress": False}
    unit_model, _ = laplace(net, x, "diag", **exact)
    fitted, _ = laplace(net, x, "diag", y=y, **exact)
    h, norms = {}, {}
    for layer in fitted.layers:
        # the diagonal curvature at unit noise precision, recovered from the unit fit's latent scales
        h[layer.name] = _unit_curvature(net, layer, x)
        norms[layer.name] = float(layer.join(net).square().sum())
    beta = noise_precision(h, norms, error, 50, 1.0)
    assert abs(float(fitted.likelihood.precision()) - beta) < 1e-9 * beta
    best = _evidence(beta, h, norms, error, 50)
    for factor in (0.5, 0.9, 1.1, 2.0):
        assert _evidence(beta * factor, h, norms, error, 50) < best
    assert 1 / 0.3**2 / 3 < beta < 3 / 0.3**2  # near the true noise precision
    assert unit_model.likelihood.precision() == 1.0  # without targets the noise stays as given


def _unit_curvature(net, layer, x):
    from pyrozoo.models.layers import find_layers
    from pyrozoo.posteriors.laplace import curvature

    layers = find_layers(net)
    curv = curvature(
        net, layers, x, "diag", progress=False, likelihood=Gaussian("fixed", 1.0), fisher="type-2"
    )
    return curv[layer.name].flatten()
