import functools
import math

import pytest
import torch
import torch.distributions as td
from pyro import poutine

from pyrozoo.bmr import prune
from pyrozoo.bmr.scores import posterior_scales, shrinkage_scores
from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.models.priors import tiered
from pyrozoo.nets import create_net


def _model(prior):
    return BayesianModel(
        create_net("mlp", in_channels=1, image_size=3, num_classes=2, hidden=(4, 3)), prior=prior
    )


@pytest.mark.parametrize("local", [False, True])
def test_tiered_log_density_and_weights_match_an_independent_computation(local):
    model = _model(functools.partial(tiered, tau0=0.05, local=local))
    trace = poutine.trace(model.sample_weights).get_trace()
    trace.compute_log_prob()
    weights = trace.nodes["_RETURN"]["value"]
    half_cauchy_pair = td.Gamma(torch.tensor(0.5), torch.tensor(1.0))
    expected = 0.0
    for layer in model.layers:
        v = {
            name.split(".")[-1]: site["value"]
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and name.startswith(layer.name + ".")
        }
        a, b = v["global"]  # each half-Cauchy pair is one site: (numerator, denominator)
        expected += half_cauchy_pair.log_prob(v["global"]).sum()
        expected += td.Normal(0.0, 1.0).log_prob(v["weight_base"]).sum()
        tau = (a / b).sqrt()
        if layer.is_output:
            scale = tau
        else:
            expected += td.Gamma(2.0, 6.0).log_prob(v["slab_precision"])
            expected += half_cauchy_pair.log_prob(v["rows"]).sum()
            s2 = (0.05 * tau) ** 2 * v["rows"][..., 0] / v["rows"][..., 1]  # horseshoe scale^2, one per row
            if local:
                expected += half_cauchy_pair.log_prob(v["weights"]).sum()
                s2 = s2 * v["weights"][..., 0] / v["weights"][..., 1]
            c2 = 1 / v["slab_precision"]
            scale = (c2 * s2 / (c2 + s2)).sqrt()  # regularised horseshoe, written the textbook way
        torch.testing.assert_close(weights[layer.name], scale * v["weight_base"], rtol=1e-4, atol=1e-6)
    total = sum(site["log_prob_sum"] for site in trace.nodes.values() if site["type"] == "sample")
    torch.testing.assert_close(total, expected)


def test_tiered_scales_have_half_cauchy_tails_and_the_slab_bounds_them():
    model = _model(tiered)
    head, hidden = model.layers[-1], model.layers[0]
    # the output scale sqrt(a/b) is half-Cauchy(1): P(X > t) = 1 - 2/pi atan(t)
    draws = torch.stack(
        [
            poutine.condition(model.prior, data={f"{head.name}.global": td.Gamma(0.5, 1.0).sample((2,))})(
                head
            )
            for _ in range(20_000)
        ]
    )
    for t in (1.0, 10.0, 100.0):
        expected = 1 - 2 / math.pi * math.atan(t)
        observed = (draws > t).double().mean().item()
        assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / len(draws)) + 1e-4
    # hidden rows: with a = b = 1 the row scale is tau0 * half-Cauchy, capped by the slab c
    pairs = td.Gamma(0.5, 1.0).sample((20_000, hidden.shape[0], 1, 2))
    slab = torch.tensor(4.0)  # c = 0.5
    scale = poutine.condition(
        model.prior,
        data={
            f"{hidden.name}.global": torch.ones(2),
            f"{hidden.name}.slab_precision": slab,
            f"{hidden.name}.rows": pairs,
        },
    )(hidden)
    assert scale.max() < 0.5 and scale.max() > 0.49  # heavy tails reach the slab, never pass it
    unregularised = 1e-2 * (pairs[..., 0] / pairs[..., 1]).sqrt()
    small = unregularised < 0.05  # far below the slab the scale is the horseshoe's own
    torch.testing.assert_close(scale[small], unregularised[small], rtol=2e-2, atol=0)


def test_shrinkage_prune_removes_rows_with_small_posterior_scale():
    model = _model(tiered)
    guide = make_guide("meanfield", model)
    layer = model.layers[0]
    # row 0: scale pushed up (row_num large), other rows: shrunk (row_num tiny)
    site = f"{layer.name}.rows"
    loc = guide.posterior()[site][0].clone()
    loc[..., 0] = -12.0  # numerators v_r
    loc[0, :, 0] = 5.0
    guide.write_posterior(site, loc, torch.full_like(loc, 4.5e-5))  # softplus(-10)
    scales = posterior_scales(model, guide, samples=20)
    assert scales[layer.name].shape == (layer.shape[0], 1)
    threshold = 1e-4
    prune(model, guide, "threshold", scores=shrinkage_scores(model, scales), margin=-threshold)
    keep = model.mask(layer.name).bool()
    expected_rows = (scales[layer.name] >= threshold).squeeze(1)
    assert expected_rows[0] and not expected_rows[1:].all()
    assert torch.equal(keep.all(dim=1), expected_rows) and torch.equal(keep.any(dim=1), expected_rows)
