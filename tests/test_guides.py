import math

import pytest
import torch
import torch.distributions as td
import torch.nn.functional as F
from pyro import poutine

from pyrozoo.errors import PyrozooError
from pyrozoo.guides import GUIDES, AutoDeltaGuide, AutoNormalGuide, MeanFieldNormal, make_guide


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


def test_meanfield_posterior_reads_its_parameters(tiny_mlp_model):
    guide = MeanFieldNormal(tiny_mlp_model, init_radius=0.5, init_scale=0.3)
    site = tiny_mlp_model.layers[1].site
    key = site.replace(".", "-")
    with torch.no_grad():
        guide.locs[key].fill_(1.25)
        guide.raw_scales[key].fill_(-1.0)
    loc, scale = guide.posterior()[site]
    assert torch.all(loc == 1.25)
    torch.testing.assert_close(scale, torch.full_like(scale, math.log1p(math.exp(-1.0))))
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


def test_autonormal_posterior_reads_its_parameters(tiny_mlp_model, tiny_batch):
    guide = make_guide("autonormal", tiny_mlp_model, *tiny_batch, 60)
    assert isinstance(guide, AutoNormalGuide)
    site = tiny_mlp_model.layers[0].site
    loc, scale = guide.posterior()[site]
    torch.testing.assert_close(loc, getattr(guide.locs.body, "1").weight_base.detach())
    torch.testing.assert_close(scale, torch.full_like(scale, 0.1))
    assert loc.abs().max() <= 2 and loc.std() > 0.5  # uniform init in (-2, 2)


def test_autodelta_posterior_is_a_point_mass(tiny_mlp_model, tiny_batch):
    guide = make_guide("autodelta", tiny_mlp_model, *tiny_batch, 60)
    assert isinstance(guide, AutoDeltaGuide)
    value, scale = guide.posterior()[tiny_mlp_model.layers[0].site]
    assert torch.equal(guide()[tiny_mlp_model.layers[0].site], value) and torch.all(scale == 0)


@pytest.mark.parametrize("kind", sorted(GUIDES))
def test_every_guide_covers_every_latent_with_matching_shapes(kind, tiny_mlp_model, tiny_batch):
    guide = make_guide(kind, tiny_mlp_model, *tiny_batch, 60)
    prior = poutine.trace(tiny_mlp_model.sample_weights).get_trace()
    latents = {name: site["value"] for name, site in prior.iter_stochastic_nodes()}
    posterior = guide.posterior()
    assert set(posterior) == set(latents)
    for name, (loc, scale) in posterior.items():
        assert loc.shape == scale.shape == latents[name].shape


def test_guide_parameters_are_local_to_each_guide(tiny_mlp_model, tiny_batch):
    first = make_guide("autonormal", tiny_mlp_model, *tiny_batch, 60)
    second = make_guide("autonormal", tiny_mlp_model, *tiny_batch, 60)
    site = tiny_mlp_model.layers[0].site
    assert not torch.equal(first.posterior()[site][0], second.posterior()[site][0])


def test_unknown_guide():
    with pytest.raises(PyrozooError, match="known guides"):
        make_guide("laplace", None)


def test_softplus_scale_gradient_flows(tiny_mlp_model):
    guide = MeanFieldNormal(tiny_mlp_model)
    site = tiny_mlp_model.layers[0].site
    guide()[site].sum().backward()
    key = site.replace(".", "-")
    assert guide.raw_scales[key].grad is not None and guide.locs[key].grad is not None
    assert torch.all(guide.locs[key].grad == 1)
    assert F.softplus(guide.raw_scales[key]).min() > 0
