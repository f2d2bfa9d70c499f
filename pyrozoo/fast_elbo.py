"""The negative ELBO of the common case without Pyro's machinery: the mean-field guide over a classifier with the
flat prior (methods flat-ff and bmr-*).

:func:`pyrozoo.elbo.negative_elbo` traces the guide, replays the model against the trace and scores every site:
on a small net that Python, and the dozens of scalar operations of the five log-normal layer precisions, cost
more than the net itself. Here the same draws (the guide's noise, drawn site by site in its order, so a seed
gives the same sample) give the same estimate (float rounding apart): the weights' KL to ``N(0, 1)`` in closed
form, fused with their sampling in one autograd node per layer, and the precisions' ``log p - log q`` at the
sample for all layers at once. :func:`fast_negative_elbo` returns None wherever the case is not this one (another
guide, prior or likelihood, an active Pyro handler, Pyro's argument checks on), and the traced path runs.
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F
from pyro.infer.util import is_validation_enabled
from pyro.poutine.runtime import _PYRO_STACK
from torch.distributions.transforms import ExpTransform

from pyrozoo.guides.meanfield import MeanFieldNormal
from pyrozoo.models.bayesian import BayesianModel
from pyrozoo.models.likelihoods import Categorical
from pyrozoo.models.priors import flat

_LOG_GAMMA_2_2 = 2 * math.log(2.0) - math.lgamma(2.0)  # Gamma(2, 2)'s log-density at p is this + log p - 2p
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def summed_kl_value(loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``sum(KL(N(loc, scale) || N(0, 1)))`` in four passes (two dot products, a log and its sum), for the
    autograd nodes that give its derivative by hand (here and :class:`pyrozoo.elbo._SummedKLToStandardNormal`).
    """
    flat_loc, flat_scale = loc.reshape(-1), scale.reshape(-1)
    squares = torch.dot(flat_scale, flat_scale) + torch.dot(flat_loc, flat_loc)
    return 0.5 * (squares - flat_loc.numel()) - flat_scale.log().sum()


class _LayerDraw(torch.autograd.Function):
    """One layer's weights ``c * mask * (loc + softplus(raw) * noise)`` and the summed KL of ``N(loc,
    softplus(raw))`` to ``N(0, 1)``, as one autograd node: the sample, the mask, the layer scale ``c`` and the KL
    with two tensors the size of the layer (the scale and the weights), where autograd records five nodes that
    each allocate one or more (the KL summed as :class:`pyrozoo.elbo._SummedKLToStandardNormal` sums it)."""

    @staticmethod
    def forward(ctx, loc, raw, noise, c, mask):
        scale = F.softplus(raw)
        z = torch.addcmul(loc, noise, scale)
        if mask is not None:
            z.mul_(mask)
        ctx.save_for_backward(loc, raw, noise, scale, c, mask)
        return z.mul_(c), summed_kl_value(loc, scale)

    @staticmethod
    def backward(ctx, grad_w, grad_kl):
        loc, raw, noise, scale, c, mask = ctx.saved_tensors
        # the sample again (one pass) rather than a saved copy: the layer's memory is the bound on a large net
        z = torch.addcmul(loc, noise, scale)
        grad_z = grad_w * c
        if mask is not None:
            z.mul_(mask)
            grad_z.mul_(mask)
        grad_c = torch.dot(grad_w.reshape(-1), z.reshape(-1))  # d/dc of sum(grad_w * c * mask * z)
        grad_loc = torch.addcmul(grad_z, loc, grad_kl)
        grad_scale = torch.addcmul(grad_z.mul_(noise), scale - scale.reciprocal(), grad_kl)
        grad_raw = grad_scale.mul_(torch.sigmoid(raw))  # softplus' derivative (torch's threshold 20 aside)
        return grad_loc, grad_raw, None, grad_c.reshape(c.shape), None


def _hidden_scale(prior) -> float | None:
    """The flat prior's hidden-layer factor, or None for any other prior (or the flat one with other options)."""
    default = inspect.signature(flat).parameters["hidden_scale"].default
    if prior is flat:
        return default
    if isinstance(prior, functools.partial) and prior.func is flat and not prior.args:
        hidden = prior.keywords.get("hidden_scale", default)
        if set(prior.keywords) <= {"hidden_scale"} and isinstance(hidden, (int, float)) and hidden > 0:
            return float(hidden)  # (a bad one goes the traced way, where flat refuses it)
    return None


def _sites(model: BayesianModel, guide: MeanFieldNormal) -> list[tuple] | None:
    """Per layer, the guide's (precision key, weight key), when its sites are the flat prior's in the model's
    order (each layer's precision, a log-normal, then its weights, a Normal); else None."""
    layers, sites = model.layers, guide._sites
    if len(sites) != 2 * len(layers):
        return None
    keys = []
    for layer, (name, (key, _, event_dim, transform)) in zip(
        (layer for layer in layers for _ in (0, 1)), sites.items()
    ):
        if name == f"{layer.name}.precision" and event_dim == 0 and isinstance(transform, ExpTransform):
            keys.append(key)
        elif name == layer.site and transform is None:
            keys.append(key)
        else:
            return None
    return list(zip(keys[::2], keys[1::2]))


def fast_negative_elbo(model, guide, x, y=None, dataset_size: int | None = None) -> torch.Tensor | None:
    """``-ELBO`` as :func:`pyrozoo.elbo.negative_elbo` estimates it, from the same draws, for the mean-field
    guide over a :class:`~pyrozoo.models.BayesianModel` with the flat prior and the categorical likelihood; None
    in any other case (then the traced path applies)."""
    if (
        type(guide) is not MeanFieldNormal
        or not isinstance(model, BayesianModel)
        or type(model.likelihood) is not Categorical
        or y is None
        or _PYRO_STACK
        or is_validation_enabled()
    ):
        return None
    hidden = _hidden_scale(model.prior)
    keys = _sites(model, guide) if hidden is not None else None
    if keys is None:
        return None
    layers = model.layers
    locs, raws = guide.locs, guide.raw_scales
    # the guide's draws in its own order (each layer's precision, then its weights): the same random numbers
    noises = [
        torch.empty(locs[key].shape, dtype=locs[key].dtype, device=locs[key].device).normal_()
        for pair in keys
        for key in pair
    ]
    # the layer precisions, all at once: u = log precision ~ N(loc, scale), c = precision^(-1/2) (times the
    # hidden factor), and log p(precision) - log q(precision) at the draw (a log-normal's log q carries -u)
    loc_u = torch.stack([locs[p] for p, _ in keys])
    scale_u = F.softplus(torch.stack([raws[p] for p, _ in keys]))
    noise_u = torch.stack(noises[::2])
    u = torch.addcmul(loc_u, noise_u, scale_u)
    precision = u.exp()
    factor = torch.tensor(
        [1.0 if layer.is_output else hidden for layer in layers], dtype=u.dtype, device=u.device
    )
    c = precision.rsqrt() * factor
    log_p = _LOG_GAMMA_2_2 + u - 2 * precision
    log_q = -0.5 * noise_u.square() - scale_u.log() - _HALF_LOG_2PI - u
    elbo = (log_p - log_q).sum()
    weights = {}
    for i, (layer, (_, key)) in enumerate(zip(layers, keys)):
        mask = model.mask(layer.name) if model.has_pruned(layer.name) else None
        weights[layer.name], kl = _LayerDraw.apply(locs[key], raws[key], noises[2 * i + 1], c[i], mask)
        elbo = elbo - kl
    logits = model.logits(x, weights)
    batch = logits.shape[-2]
    log_likelihood = -F.cross_entropy(logits, y, reduction="sum")
    return -(elbo + log_likelihood * ((dataset_size or batch) / batch))
