"""The one check that a posterior belongs to the model it is used with, before BMR or rebuild touch either."""

from __future__ import annotations

import pyro.poutine as poutine
import torch

from pyrozoo.errors import PyrozooError


@torch.no_grad()
def check_posterior(model, posterior) -> None:
    """Raise a PyrozooError unless ``posterior`` has every latent site of ``model`` (each layer's weights and
    its prior's scales) with the model's shape, and no site the model lacks: a guide of another model (other
    net, sizes or prior) would otherwise fail deep inside with a bare KeyError or shape error, or worse, not
    fail."""
    with torch.random.fork_rng(devices=[]), poutine.block():  # the model's own draw, without a trace left
        trace = poutine.trace(model.sample_weights).get_trace()
    expected = {
        name: tuple(site["value"].shape)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    have = list(posterior.sites())
    problems = [f"no site {name}" for name in expected if name not in have]
    problems += [f"a site {name} the model lacks" for name in have if name not in expected]
    if not problems:
        means = posterior.mean()
        problems = [
            f"{name} of shape {tuple(means[name].shape)}, not {shape}"
            for name, shape in expected.items()
            if tuple(means[name].shape) != shape
        ]
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise PyrozooError(
            f"the posterior ({type(posterior).__name__}) does not belong to this model: it has {shown}; use the "
            "guide trained with this model (same net, sizes and prior)"
        )
