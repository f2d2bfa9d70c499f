import math

import pytest
import torch
import torch.distributions as td
from pyro import poutine
from torch.distributions import biject_to, constraints

from pyrozoo.errors import PyrozooError
from pyrozoo.guides import AutoDeltaGuide, AutoNormalGuide, MeanFieldNormal, make_guide
from pyrozoo.guides.base import constrained_mean


def test_meanfield_log_density_is_normal_and_log_normal(tiny_mlp_model):
    guide = MeanFieldNormal(tiny_mlp_model)
    trace = poutine.trace(guide).get_trace()
    trace.compute_log_prob()
    posterior = guide.posterior()
    for layer in tiny_mlp_model.layers:
        loc, scale = posterior[layer.site]
        z = trace.nodes[layer.site]["value"]
        torch.testing.assert_close(
            trace.nodes[layer.site]["log_prob_sum"], td.Normal(loc, scale).log_prob(z).sum()
        )
        site = f"{layer.name}.precision"
        loc, scale = posterior[site]
        precision = trace.nodes[site]["value"]
        assert precision > 0
        torch.testing.assert_close(
            trace.nodes[site]["log_prob_sum"], td.LogNormal(loc, scale).log_prob(precision)
        )


def test_meanfield_posterior_reads_what_was_written(tiny_mlp_model):
    guide = MeanFieldNormal(tiny_mlp_model, init_radius=0.5, init_scale=0.3)
    site = tiny_mlp_model.layers[1].site
    loc, scale = guide.posterior()[site]
    new_scale = math.log1p(math.exp(-1.0))
    guide.write_posterior(site, torch.full_like(loc, 1.25), torch.full_like(scale, new_scale))
    loc, scale = guide.posterior()[site]
    assert torch.all(loc == 1.25)
    torch.testing.assert_close(scale, torch.full_like(scale, new_scale))
    other_loc, other_scale = guide.posterior()[tiny_mlp_model.layers[0].site]
    assert other_loc.abs().max() <= 0.5 and other_loc.std() > 0  # uniform init in (-0.5, 0.5)
    torch.testing.assert_close(other_scale, torch.full_like(other_scale, 0.3))
    assert torch.equal(guide.median()[site], loc)
    precision_site = f"{tiny_mlp_model.layers[1].name}.precision"
    torch.testing.assert_close(guide.median()[precision_site], guide.posterior()[precision_site][0].exp())


def test_meanfield_samples_are_loc_plus_scale_noise(tiny_mlp_model):
    guide = MeanFieldNormal(tiny_mlp_model, init_scale=0.05)
    site = tiny_mlp_model.layers[0].site
    draws = torch.stack([guide()[site] for _ in range(4000)])
    loc, scale = guide.posterior()[site]
    torch.testing.assert_close(draws.mean(0), loc, atol=0.01, rtol=0)
    torch.testing.assert_close(draws.std(0), scale, atol=0.01, rtol=0)


def test_autonormal_posterior_agrees_with_pyros_quantiles(tiny_mlp_model):
    guide = make_guide("autonormal", tiny_mlp_model)
    assert isinstance(guide, AutoNormalGuide)
    site = tiny_mlp_model.layers[0].site
    loc, scale = guide.posterior()[site]
    # Pyro's own reading of the guide's parameters: quantiles of N(loc, scale) (real latent: no transform)
    median, one_sd = guide.quantiles([0.5, td.Normal(0.0, 1.0).cdf(torch.tensor(1.0)).item()])[site]
    torch.testing.assert_close(loc, median)
    torch.testing.assert_close(scale, one_sd - median)
    torch.testing.assert_close(scale, torch.full_like(scale, 0.1))
    assert loc.abs().max() <= 2 and loc.std() > 0.5  # uniform init in (-2, 2)


def test_autodelta_posterior_is_a_point_mass(tiny_mlp_model, tiny_batch):
    guide = make_guide("autodelta", tiny_mlp_model, *tiny_batch, 60)
    assert isinstance(guide, AutoDeltaGuide) and guide.point_mass
    value, scale = guide.posterior()[tiny_mlp_model.layers[0].site]
    assert torch.equal(guide()[tiny_mlp_model.layers[0].site], value) and torch.all(scale == 0)
    precision = f"{tiny_mlp_model.layers[0].name}.precision"
    assert torch.equal(guide()[precision], guide.mean()[precision])  # the mean is the point itself
    torch.testing.assert_close(guide.posterior()[precision][0], guide.mean()[precision].log())


def test_unknown_guide():
    with pytest.raises(PyrozooError, match="known guides"):
        make_guide("laplace", None)


def test_scales_learn_towards_zero_and_stay_positive(tiny_mlp_model):
    """Gradients reach loc and scale through the reparametrised sample; softplus keeps the scale positive
    without clipping even as the objective pushes it to 0."""
    guide = MeanFieldNormal(tiny_mlp_model)
    site = tiny_mlp_model.layers[0].site
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.1)
    for _ in range(300):
        loss = guide()[site].square().mean()  # E[z^2] = loc^2 + scale^2, smallest at loc 0, scale 0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loc, scale = guide.posterior()[site]
    assert loc.abs().max() < 0.05
    assert scale.max() < 0.05 and bool((scale > 0).all())  # from 0.1


def test_constrained_mean_of_the_identity_is_the_loc():
    # biject_to(real) is an empty composition; it made `pyrozoo export` of an autonormal run crash
    loc, scale = torch.randn(3), torch.rand(3)
    assert torch.equal(constrained_mean(loc, scale, biject_to(constraints.real)), loc)


def test_constrained_mean_by_quadrature_matches_numerical_integration():
    loc = torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float64)
    scale = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    transform = biject_to(constraints.unit_interval)  # a sigmoid: no closed-form mean
    grid = torch.linspace(-12, 12, 20001, dtype=torch.float64)
    values = loc[:, None] + scale[:, None] * grid
    density = td.Normal(0.0, 1.0).log_prob(grid).exp()
    expected = torch.trapezoid(torch.sigmoid(values) * density, grid, dim=-1)
    torch.testing.assert_close(constrained_mean(loc, scale, transform), expected, rtol=1e-6, atol=1e-8)
    assert not torch.allclose(constrained_mean(loc, scale, transform), torch.sigmoid(loc), atol=1e-3)


def test_meanfield_init_locs_replace_only_the_named_sites_after_every_draw(tiny_mlp_model):
    """init_locs start chosen sites at given values (another run's draw, say) without changing the others."""
    site = f"{tiny_mlp_model.layers[0].name}.precision"
    torch.manual_seed(3)
    plain = make_guide("meanfield", tiny_mlp_model).posterior()
    torch.manual_seed(3)
    given = make_guide("meanfield", tiny_mlp_model, options={"init_locs": {site: 1.5}}).posterior()
    assert torch.all(given[site][0] == 1.5) and not torch.all(plain[site][0] == 1.5)
    assert all(torch.equal(given[s][0], plain[s][0]) for s in plain if s != site)
    with pytest.raises(PyrozooError, match="has no latent 'nope'"):
        make_guide("meanfield", tiny_mlp_model, options={"init_locs": {"nope": 0.0}})
    with pytest.raises(PyrozooError, match="guide 'meanfield' takes no option 'bogus'"):
        make_guide("meanfield", tiny_mlp_model, options={"bogus": 1})


def test_meanfield_normal_samples_as_torchs_normal():
    """The guide's Normal (one fused multiply-add, no broadcasting) draws what torch's Normal draws from the same
    seed (to rounding), scores alike, and expands (as under a plate)."""
    from pyrozoo.guides.meanfield import _Normal

    loc, scale = torch.randn(4, 3), torch.rand(4, 3) + 0.1
    torch.manual_seed(1)
    ours = _Normal(loc, scale).rsample()
    torch.manual_seed(1)
    theirs = torch.distributions.Normal(loc, scale).rsample()
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        _Normal(loc, scale).log_prob(ours), torch.distributions.Normal(loc, scale).log_prob(ours)
    )
    wide = _Normal(loc, scale).expand([2, 4, 3])
    assert wide.batch_shape == (2, 4, 3) and wide.rsample().shape == (2, 4, 3)
