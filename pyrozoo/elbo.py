"""The training objective: a differentiable negative ELBO with analytic KL terms wherever they exist."""

from __future__ import annotations

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence


def _log_prob_sum(site) -> torch.Tensor:
    return scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"]).sum()


def negative_elbo(model, guide, *args, **kwargs) -> torch.Tensor:
    """One-sample estimate of ``-ELBO`` for ``model(*args, **kwargs)`` and a mean-field ``guide``.

    The same estimator as :class:`pyro.infer.TraceMeanField_ELBO`: ``E_q[log p(y|w)]`` (scaled by the data
    plate) minus the analytic ``KL(q || p)`` of each latent whose pair of distributions has one registered, and
    ``log p - log q`` at the sample otherwise. Unlike Pyro's it computes no log-density it then discards (Pyro
    evaluates every site's log-density for its traces), which matters when a latent has a million entries.
    """
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    elbo = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue  # a plate's subsample indices are recorded as a sample site but carry no density
        if site["is_observed"]:
            elbo = elbo + _log_prob_sum(site)
            continue
        q = guide_trace.nodes[name]
        try:
            kl = kl_divergence(q["fn"], site["fn"])
        except NotImplementedError:
            elbo = elbo + _log_prob_sum(site) - _log_prob_sum(q)
        else:
            elbo = elbo - scale_and_mask(kl, q["scale"], q["mask"]).sum()
    for name, q in guide_trace.nodes.items():  # auxiliary guide sites (e.g. AutoNormal's unconstrained ones)
        if q["type"] == "sample" and name not in model_trace.nodes:
            elbo = elbo - _log_prob_sum(q)
    return -elbo
