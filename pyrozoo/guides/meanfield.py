"""Our mean-field guide: a Normal per latent entry, sampled as a Normal so the ELBO can use the analytic KL."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import (
    AffineTransform,
    ComposeTransform,
    ExpTransform,
    IndependentTransform,
)


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


def constrained_mean(loc: torch.Tensor, scale: torch.Tensor, transform) -> torch.Tensor:
    """Mean of ``transform(N(loc, scale))``: exact for the identity and for exp followed by affine maps (a
    log-normal, possibly shifted: Pyro maps Gamma's support that way), else the median ``transform(loc)``."""
    if transform is None:
        return loc
    while hasattr(transform, "base_transform"):  # IndependentTransform only reinterprets dimensions
        transform = transform.base_transform
    parts = transform.parts if isinstance(transform, ComposeTransform) else [transform]
    if isinstance(parts[0], ExpTransform) and all(isinstance(part, AffineTransform) for part in parts[1:]):
        value = torch.exp(loc + scale.square() / 2)
        for affine in parts[1:]:  # affine maps commute with the expectation
            value = affine(value)
        return value
    return transform(loc)


def _base(support):
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support


def _bijection(support):
    """The map from unconstrained space onto ``support``; plain exp onto (0, inf) or [0, inf), where torch
    composes exp with an identity affine map that only costs time (a density puts no mass on the point 0)."""
    base = _base(support)
    bounded_at_zero = isinstance(base, (constraints.greater_than, constraints.greater_than_eq))
    if bounded_at_zero and isinstance(base.lower_bound, (int, float)) and base.lower_bound == 0:
        return (
            IndependentTransform(ExpTransform(), support.event_dim) if support.event_dim else ExpTransform()
        )
    return biject_to(support)


class MeanFieldNormal(nn.Module):
    """Fully factorised Gaussian posterior over the latents of a :class:`~pyrozoo.models.BayesianModel`.

    Real-valued latents (the weights' ``z``) get ``N(loc, scale)`` and are sampled as such, so the KL to the
    model's ``N(0, 1)`` prior is analytic. Constrained latents (e.g. a layer's positive precision) get a Normal in
    the unconstrained space pushed through the support's bijection (a log-normal for positive ones).
    ``scale = softplus(raw_scale)`` keeps scales positive without clipping.

    Usage::

        guide = MeanFieldNormal(model)
        posterior = guide.posterior()   # {site: (loc, scale)} in unconstrained space, for BMR

    :param init_radius: initial locs are drawn uniformly from ``(-init_radius, init_radius)`` (unconstrained).
    :param init_scale: initial scale of every entry.
    :param latents: a data-free callable drawing the latents to cover (default ``model.sample_weights``).
    """

    def __init__(self, model, init_radius: float = 2.0, init_scale: float = 0.1, latents=None):
        super().__init__()
        self._model = (model,)  # a tuple, so the model's buffers and net are not registered as ours
        with poutine.block():  # trace the prior without letting outer handlers (an ELBO's trace) see it
            prototype = poutine.trace(latents or model.sample_weights).get_trace()
        self.locs = nn.ParameterDict()
        self.raw_scales = nn.ParameterDict()
        self._sites: dict[str, tuple[str, int, object]] = {}  # site -> (parameter key, event dim, transform)
        for name, site in prototype.iter_stochastic_nodes():
            transform = _bijection(site["fn"].support)
            value = site["value"].detach()
            key = name.replace(".", "-")  # parameter names cannot hold dots
            loc = torch.empty_like(transform.inv(value)).uniform_(-init_radius, init_radius)
            self.locs[key] = nn.Parameter(loc)
            self.raw_scales[key] = nn.Parameter(torch.full_like(loc, _inverse_softplus(init_scale)))
            real = _base(site["fn"].support) is constraints.real
            self._sites[name] = (key, site["fn"].event_dim, None if real else transform.with_cache(1))

    def _distribution(self, name: str):
        key, event_dim, transform = self._sites[name]
        base = dist.Normal(self.locs[key], F.softplus(self.raw_scales[key])).to_event(event_dim)
        return base if transform is None else dist.TransformedDistribution(base, transform)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Sample every latent (the model's arguments are accepted and ignored)."""
        return {name: pyro.sample(name, self._distribution(name)) for name in self._sites}

    @torch.no_grad()
    def posterior(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{site: (loc, scale)}`` of every latent, in unconstrained space."""
        return {
            name: (self.locs[key].detach(), F.softplus(self.raw_scales[key]).detach())
            for name, (key, _, _) in self._sites.items()
        }

    @torch.no_grad()
    def mean(self) -> dict[str, torch.Tensor]:
        """Posterior mean of every latent in its own (constrained) space."""
        posterior = self.posterior()
        return {name: constrained_mean(*posterior[name], t) for name, (_, _, t) in self._sites.items()}

    @torch.no_grad()
    def write_posterior(self, name: str, loc: torch.Tensor, scale: torch.Tensor) -> None:
        """Set a latent's posterior (unconstrained space), e.g. to a reduced posterior computed by BMR."""
        key = self._sites[name][0]
        self.locs[key].copy_(loc)
        self.raw_scales[key].copy_(torch.where(scale > 20, scale, torch.expm1(scale).log()))  # softplus^-1

    @torch.no_grad()
    def reset_to_prior(self, name: str, where: torch.Tensor) -> None:
        """Set entries ``where`` of a real-valued latent back to N(0, 1): the exact posterior of a pruned weight."""
        key = self._sites[name][0]
        self.locs[key].masked_fill_(where, 0.0)
        self.raw_scales[key].masked_fill_(where, _inverse_softplus(1.0))

    @torch.no_grad()
    def median(self) -> dict[str, torch.Tensor]:
        """Posterior median of every latent in its own (constrained) space; the mean for real-valued ones."""
        return {
            name: (self.locs[key] if t is None else t(self.locs[key])).detach()
            for name, (key, _, t) in self._sites.items()
        }
