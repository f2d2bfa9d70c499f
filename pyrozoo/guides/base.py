"""The one posterior contract that BMR, rebuild, export and training use, whatever produced the posterior.

Every guide in :data:`pyrozoo.guides.GUIDES` subclasses :class:`Posterior`. Callers read ``point_mass`` and call
the methods below; they never probe a guide for what it can do.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np
import torch
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import (
    AffineTransform,
    ComposeTransform,
    ExpTransform,
    IndependentTransform,
)

from pyrozoo.errors import PyrozooError


class Posterior:
    """A posterior over every latent site of a model (the model's ``sample_weights`` draws them all).

    - Calling it samples every latent with ``pyro.sample`` under the site's name and returns ``{site: value}``;
      it accepts and ignores the model's arguments, so it can be the guide of SVI.
    - ``posterior()`` is ``{site: (loc, scale)}`` in unconstrained space (``biject_to(support)``'s domain), a
      Normal per entry; a point mass has ``scale`` 0.
    - ``mean()`` and ``median()`` are ``{site: tensor}`` in each site's own (constrained) space.
    - ``write_posterior(site, loc, scale, where=None)`` sets a site's posterior, in unconstrained space.
    - ``reset_to_prior(site, where)`` sets entries ``where`` of a real-valued weight latent, whose prior is
      N(0, 1), to that prior: loc 0, scale 1 (a point mass: the prior's mode 0).
    - ``reduce(site, pruned)`` writes the reduced posterior after the entries ``pruned`` are removed: the
      prior for them, and for a correlated posterior the reduced mean of the others.
    - ``point_mass`` (class attribute) is True when the posterior has no spread, so BMR, which needs spread,
      can refuse it up front; ``fixed_prior`` is True when it covers only weight latents, for a prior without
      hyperparameters (IVON's).

    A subclass implements ``sites``, ``site_support``, ``site_posterior`` and ``_write``.
    """

    point_mass: ClassVar[bool] = False
    # True when the model's prior must be fixed, with no hyperparameter latents (IVON's prior is its weight decay)
    fixed_prior: ClassVar[bool] = False
    # the scale every weight entry starts at (a guide's init_scale), or None when it starts nowhere fixed
    start_scale: float | None = None

    # --- what a subclass implements ------------------------------------------------------------------------

    def sites(self) -> list[str]:
        """Names of the latent sites, in the model's order."""
        raise NotImplementedError

    def site_support(self, site: str) -> constraints.Constraint:
        """The support of ``site``'s prior (its constrained space)."""
        raise NotImplementedError

    def site_posterior(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of one site in unconstrained space, detached."""
        raise NotImplementedError

    def _write(self, site: str, loc: torch.Tensor, scale: torch.Tensor, where: torch.Tensor | None) -> None:
        """Store ``(loc, scale)`` for the entries ``where`` of ``site`` (all when None); already checked."""
        raise NotImplementedError

    def moved(self, model) -> tuple[float, str] | None:
        """How far the posterior has moved from where it started, so that BMR reads it only once the data speak:
        the fraction of the live entries of ``model``'s prunable layers that have moved, and what moving means;
        None for a posterior that does not start at a fixed value. Here: scales that moved from ``start_scale``
        (a subclass with another start, IVON's Hessian, says so itself)."""
        if self.start_scale is None or self.point_mass:
            return None
        sites = set(self.sites())  # of the prunable layers only: moved_fraction reads no other
        scales = {
            layer.site: self.site_posterior(layer.site)[1]
            for layer in model.layers
            if layer.prunable and layer.site in sites
        }
        what = f"the posterior scale moved by half its start ({self.start_scale:g})"
        return moved_fraction(model, scales, self.start_scale), what

    def forced_pass_warning(self, steps: int) -> str | None:
        """Why a BMR pass forced after ``steps`` training steps (``--warmup-steps``) would read a posterior still
        near its start, or None when it would not. A posterior whose start is averaged away slowly (IVON's
        Hessian) says so itself."""
        return None

    # --- the contract, on top of those ---------------------------------------------------------------------

    @torch.no_grad()
    def posterior(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{site: (loc, scale)}`` of every latent, in unconstrained space (scale 0 for a point mass)."""
        return {site: self.site_posterior(site) for site in self.sites()}

    @torch.no_grad()
    def site_mean(self, site: str) -> torch.Tensor:
        """Posterior mean of one latent in its own (constrained) space."""
        return constrained_mean(*self.site_posterior(site), bijection(self.site_support(site)))

    @torch.no_grad()
    def mean(self) -> dict[str, torch.Tensor]:
        """Posterior mean of every latent in its own (constrained) space."""
        return {site: self.site_mean(site) for site in self.sites()}

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Posterior median of every latent in its own (constrained) space: the loc mapped onto the support.
        Arguments are accepted and ignored, as by Pyro's autoguides."""
        return {
            site: bijection(self.site_support(site))(self.site_posterior(site)[0]) for site in self.sites()
        }

    @torch.no_grad()
    def write_posterior(
        self, site: str, loc: torch.Tensor, scale: torch.Tensor, where: torch.Tensor | None = None
    ) -> None:
        """Set ``site``'s posterior to ``N(loc, scale)`` in unconstrained space, e.g. a reduced posterior from
        BMR; with ``where`` (bool, shaped like the latent) only those entries change.

        A spread posterior needs ``scale > 0``; a point mass takes ``loc`` and needs ``scale == 0``. Either
        refuses the other kind with a :class:`PyrozooError` rather than silently dropping or inventing spread.
        """
        current, _ = self.site_posterior(site)
        loc, scale = torch.as_tensor(loc).to(current), torch.as_tensor(scale).to(current)
        if loc.shape != current.shape or scale.shape != current.shape:
            raise PyrozooError(
                f"posterior of {site} must have shape {tuple(current.shape)}, "
                f"got loc {tuple(loc.shape)} and scale {tuple(scale.shape)}"
            )
        written = scale if where is None else scale[where]
        if self.point_mass and bool((written != 0).any()):
            raise PyrozooError(f"{type(self).__name__} is a point mass: it cannot hold a scale other than 0")
        if not self.point_mass and not bool((written > 0).all()):
            raise PyrozooError(f"{type(self).__name__} needs positive scales; {site} was given one <= 0")
        self._write(site, loc, scale, where)

    @torch.no_grad()
    def reduce(self, site: str, pruned: torch.Tensor) -> None:
        """Write the reduced posterior of a point-mass reduction of the entries ``pruned`` (bool, shaped like the
        latent) of the weight latent ``site``: the pruned entries get their prior (:meth:`reset_to_prior`). A
        factorised posterior's surviving entries keep their posterior, which is then the reduced one; a
        correlated posterior (a KFAC Laplace) moves them to the reduced mean as well."""
        self.reset_to_prior(site, pruned)

    @torch.no_grad()
    def reset_to_prior(self, site: str, where: torch.Tensor) -> None:
        """Set entries ``where`` of the real-valued weight latent ``site`` to its prior N(0, 1): the exact
        posterior of a pruned weight, which no longer touches the likelihood."""
        if _base(self.site_support(site)) is not constraints.real:
            raise PyrozooError(
                f"reset_to_prior needs a real-valued latent with prior N(0, 1); {site} is not one"
            )
        loc, _ = self.site_posterior(site)
        self._write(site, torch.zeros_like(loc), torch.full_like(loc, 0.0 if self.point_mass else 1.0), where)


MOVED = 0.5  # an entry has moved from its start once it differs from it by this fraction of the start value


@torch.no_grad()
def moved_fraction(model, values: dict[str, torch.Tensor], start: float) -> float:
    """The fraction of the live entries of ``model``'s prunable layers whose value (``values``, by site) differs
    from ``start`` by at least ``MOVED * start`` (1 when no entry is live: nothing is left to wait for)."""
    moved = live = 0
    for layer in model.layers:
        if layer.prunable and layer.site in values:
            mask = model.mask(layer.name) != 0
            far = (values[layer.site] - start).abs() >= MOVED * start
            moved, live = moved + int((far & mask).sum()), live + int(mask.sum())
    return moved / live if live else 1.0


# --- unconstrained <-> constrained -------------------------------------------------------------------------


def _base(support: constraints.Constraint) -> constraints.Constraint:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support


def bijection(support: constraints.Constraint):
    """The map from unconstrained space onto ``support`` (``biject_to``), with plain exp onto (0, inf) or
    [0, inf), where torch composes exp with an identity affine map that only costs time (a density puts no mass
    on the point 0). Both give the same unconstrained values, so guides that use either agree."""
    base = _base(support)
    bounded_at_zero = isinstance(base, (constraints.greater_than, constraints.greater_than_eq))
    if bounded_at_zero and isinstance(base.lower_bound, (int, float)) and base.lower_bound == 0:
        return (
            IndependentTransform(ExpTransform(), support.event_dim) if support.event_dim else ExpTransform()
        )
    return biject_to(support)


_QUADRATURE_POINTS = 32


def constrained_mean(loc: torch.Tensor, scale: torch.Tensor, transform) -> torch.Tensor:
    """Mean of ``transform(N(loc, scale))`` entrywise. Exact for the identity (``biject_to(real)`` is an empty
    composition) and for exp followed by affine maps (a log-normal, possibly shifted: Pyro maps Gamma's support
    that way); Gauss-Hermite quadrature for any other entrywise map (e.g. a sigmoid onto (0, 1)); the median
    ``transform(loc)`` for maps that mix entries (e.g. onto a simplex), which have no entrywise mean."""
    if transform is None:
        return loc
    while isinstance(transform, IndependentTransform):  # only reinterprets dimensions
        transform = transform.base_transform
    parts = transform.parts if isinstance(transform, ComposeTransform) else [transform]
    if not parts:
        return loc
    if isinstance(parts[0], ExpTransform) and all(isinstance(part, AffineTransform) for part in parts[1:]):
        value = torch.exp(loc + scale.square() / 2)
        for affine in parts[1:]:  # affine maps commute with the expectation
            value = affine(value)
        return value
    if transform.domain.event_dim == 0 and transform.codomain.event_dim == 0:
        nodes, weights = np.polynomial.hermite.hermgauss(_QUADRATURE_POINTS)
        nodes = torch.as_tensor(nodes, dtype=loc.dtype, device=loc.device) * math.sqrt(2)
        weights = torch.as_tensor(weights, dtype=loc.dtype, device=loc.device) / math.sqrt(math.pi)
        points = loc.unsqueeze(-1) + scale.unsqueeze(-1) * nodes
        return (transform(points) * weights).sum(-1)
    return transform(loc)


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """``x`` with ``softplus(x) = y``; for large ``y`` softplus is the identity to float precision."""
    return torch.where(y > 20, y, torch.expm1(y).log())


# Under every prior the guides cover, the latents are standard normal (non-centred) or a transform of a unit-scale
# variable, so a posterior that starts wider than this, or centred farther out, has no use and overflows float32.
MAX_START = 1e3


def check_start(init_radius: float, init_scale: float | None, guide: str) -> None:
    """A guide's start options in range: ``init_radius`` in [0, MAX_START], ``init_scale`` in (0, MAX_START]."""
    if not 0 <= init_radius <= MAX_START:
        raise PyrozooError(f"guide {guide!r}: init_radius must lie in [0, {MAX_START:g}], got {init_radius}")
    if init_scale is not None and not 0 < init_scale <= MAX_START:
        raise PyrozooError(f"guide {guide!r}: init_scale must lie in (0, {MAX_START:g}], got {init_scale}")
