"""The posterior contract (pyrozoo.guides.base.Posterior), run over every registered guide, as Pyro's autoguide
tests run over every guide class: a new guide is tested here without new test code."""

import io

import pytest
import torch
from pyro import poutine

from pyrozoo.elbo import negative_elbo
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import GUIDES, Posterior, make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.models.priors import flat, gaussian
from pyrozoo.nets import create_net

KINDS = list(GUIDES)


@pytest.fixture
def tiny_mlp_model(kind):
    """conftest's tiny MLP, with the fixed gaussian prior for a guide that needs one (IVON: its weight decay)."""
    prior = gaussian if GUIDES[kind].fixed_prior else flat
    return BayesianModel(create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(5, 4)), prior)


def _latents(model) -> dict[str, torch.Tensor]:
    trace = poutine.trace(model.sample_weights).get_trace()
    return {name: site["value"] for name, site in trace.iter_stochastic_nodes()}


def _weight_sites(model) -> list[str]:
    return [layer.site for layer in model.layers]


def _some_posterior(guide, loc_radius: float = 1.0, scale: float = 0.5):
    """A posterior unlike any initialisation: locs uniform in (-loc_radius, loc_radius), the given scale (0 for a
    point mass), written through the contract."""
    generator = torch.Generator().manual_seed(1)
    written = {}
    for site, (loc, _) in guide.posterior().items():
        new_loc = (torch.rand(loc.shape, generator=generator) * 2 - 1) * loc_radius
        new_scale = torch.full_like(loc, 0.0 if guide.point_mass else scale)
        guide.write_posterior(site, new_loc, new_scale)
        written[site] = (new_loc, new_scale)
    return written


def _train(model, guide, batch, steps: int = 3) -> None:
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.05)
    for _ in range(steps):
        loss = negative_elbo(model, guide, *batch, 60)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("kind", KINDS)
def test_every_guide_is_a_posterior_built_without_data(kind, tiny_mlp_model):
    guide = make_guide(kind, tiny_mlp_model)  # no batch
    assert isinstance(guide, Posterior) and isinstance(guide, GUIDES[kind])
    assert isinstance(type(guide).point_mass, bool)


@pytest.mark.parametrize("kind", KINDS)
def test_posterior_covers_exactly_the_models_latents(kind, tiny_mlp_model):
    guide = make_guide(kind, tiny_mlp_model)
    latents = _latents(tiny_mlp_model)
    posterior = guide.posterior()
    assert set(posterior) == set(latents) == set(guide.mean()) == set(guide.median())
    for name, (loc, scale) in posterior.items():
        assert loc.shape == scale.shape == latents[name].shape
        assert bool((scale == 0).all()) if guide.point_mass else bool((scale > 0).all())


@pytest.mark.parametrize("kind", KINDS)
def test_calling_the_guide_samples_every_latent_in_its_support(kind, tiny_mlp_model, tiny_batch):
    guide = make_guide(kind, tiny_mlp_model)
    trace = poutine.trace(guide).get_trace(*tiny_batch, 60)  # called as SVI calls it: with the model's args
    latents = _latents(tiny_mlp_model)
    sampled = {name: site["value"] for name, site in trace.iter_stochastic_nodes() if name in latents}
    assert set(sampled) == set(latents)
    for name, value in sampled.items():
        assert value.shape == latents[name].shape
        support = poutine.trace(tiny_mlp_model.sample_weights).get_trace().nodes[name]["fn"].support
        assert bool(support.check(value).all()), name


@pytest.mark.parametrize("kind", KINDS)
def test_write_posterior_round_trips(kind, tiny_mlp_model):
    guide = make_guide(kind, tiny_mlp_model)
    written = _some_posterior(guide)
    posterior = guide.posterior()
    for site, (loc, scale) in written.items():
        torch.testing.assert_close(posterior[site][0], loc)
        torch.testing.assert_close(posterior[site][1], scale)


@pytest.mark.parametrize("kind", KINDS)
def test_write_posterior_with_where_changes_only_those_entries(kind, tiny_mlp_model):
    guide = make_guide(kind, tiny_mlp_model)
    site = tiny_mlp_model.layers[0].site
    before = guide.posterior()
    loc, scale = before[site]
    where = torch.rand(loc.shape) < 0.5
    new_scale = torch.full_like(scale, 0.0 if guide.point_mass else 0.7)
    guide.write_posterior(site, torch.full_like(loc, 0.25), new_scale, where=where)
    after = guide.posterior()
    torch.testing.assert_close(after[site][0][where], torch.full_like(loc, 0.25)[where])
    torch.testing.assert_close(after[site][1][where], new_scale[where])
    assert torch.equal(after[site][0][~where], loc[~where])
    assert torch.equal(after[site][1][~where], scale[~where])
    for other in set(before) - {site}:
        assert all(torch.equal(a, b) for a, b in zip(after[other], before[other]))


@pytest.mark.parametrize("kind", KINDS)
def test_write_posterior_refuses_the_wrong_kind_of_scale(kind, tiny_mlp_model):
    guide = make_guide(kind, tiny_mlp_model)
    site = tiny_mlp_model.layers[0].site
    loc, _ = guide.posterior()[site]
    wrong = torch.full_like(loc, 0.5) if guide.point_mass else torch.zeros_like(loc)
    with pytest.raises(PyrozooError, match="point mass" if guide.point_mass else "positive"):
        guide.write_posterior(site, loc, wrong)
    with pytest.raises(PyrozooError, match="shape"):
        guide.write_posterior(site, loc[:1], torch.ones(1))


@pytest.mark.parametrize("kind", KINDS)
def test_reset_to_prior_sets_exactly_the_chosen_entries(kind, tiny_mlp_model, tiny_batch):
    guide = make_guide(kind, tiny_mlp_model)
    _train(tiny_mlp_model, guide, tiny_batch)  # trained values: no entry happens to sit at the prior already
    site = tiny_mlp_model.layers[1].site
    before = guide.posterior()
    loc, scale = before[site]
    where = torch.rand(loc.shape) < 0.4
    assert where.any() and (~where).any()
    guide.reset_to_prior(site, where)
    after = guide.posterior()
    assert bool((after[site][0][where] == 0).all())
    prior_scale = 0.0 if guide.point_mass else 1.0
    torch.testing.assert_close(after[site][1][where], torch.full_like(scale, prior_scale)[where])
    assert torch.equal(after[site][0][~where], loc[~where])
    assert torch.equal(after[site][1][~where], scale[~where])
    for other in set(before) - {site}:
        assert all(torch.equal(a, b) for a, b in zip(after[other], before[other]))
    assert bool((guide.mean()[site][where] == 0).all())  # rebuild reads a pruned weight's latent as 0


@pytest.mark.parametrize("kind", KINDS)
def test_reset_to_prior_refuses_a_constrained_latent(kind, tiny_mlp_model):
    if GUIDES[kind].fixed_prior:
        pytest.skip("a guide for a fixed prior has no constrained latent")
    guide = make_guide(kind, tiny_mlp_model)
    with pytest.raises(PyrozooError, match="real-valued"):
        guide.reset_to_prior(f"{tiny_mlp_model.layers[0].name}.precision", torch.tensor(True))


@pytest.mark.parametrize("kind", KINDS)
def test_mean_agrees_with_monte_carlo(kind, tiny_mlp_model):
    guide = make_guide(kind, tiny_mlp_model)
    # scale 0.5 puts a log-normal's mean exp(s^2 / 2) = 13% above its median, far outside the tolerance below
    _some_posterior(guide, scale=0.5)
    draws = 2000
    total: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for _ in range(draws):
            for name, value in guide().items():
                total[name] = total.get(name, 0) + value
    mean, median = guide.mean(), guide.median()
    assert set(mean) == set(total) == set(_latents(tiny_mlp_model))
    for name, value in mean.items():
        # standard errors: 0.5 / sqrt(2000) = 0.011 for real latents, 1.2% relative for log-normal ones
        torch.testing.assert_close(total[name] / draws, value, atol=0.05, rtol=0.06, msg=name)
        if not guide.point_mass and name not in _weight_sites(tiny_mlp_model):
            assert not torch.allclose(value, median[name], rtol=0.1), name  # the mean, not the median


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_reloads_into_a_guide_built_without_data(kind, tiny_mlp_model, tiny_batch):
    guide = make_guide(kind, tiny_mlp_model, *tiny_batch, 60)  # as training builds it
    _train(tiny_mlp_model, guide, tiny_batch)
    buffer = io.BytesIO()
    torch.save(guide.state_dict(), buffer)  # as a checkpoint holds it
    buffer.seek(0)
    fresh = make_guide(kind, tiny_mlp_model)
    fresh.load_state_dict(torch.load(buffer))
    expected, got = guide.posterior(), fresh.posterior()
    assert set(got) == set(expected)
    for site in expected:
        assert torch.equal(got[site][0], expected[site][0]) and torch.equal(got[site][1], expected[site][1])
    torch.testing.assert_close(fresh.mean(), guide.mean(), rtol=0, atol=0)
    assert torch.isfinite(negative_elbo(tiny_mlp_model, fresh, *tiny_batch, 60))  # and it trains on
