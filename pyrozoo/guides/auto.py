"""Pyro's autoguides behind pyrozoo's posterior contract, built without data and without global side effects.

They are built on the model's data-free ``sample_weights`` and set up at once, so a saved guide reloads from
its ``state_dict`` with no example batch. Pyro's ``module_local_params`` setting keeps a PyroModule's parameters
in the module instead of Pyro's global param store, so two guides never share values; PyroModule reads it only
while its own context is active (inside ``__call__``), and when it creates that context. These guides switch it
on for exactly those moments, never for the process, so other Pyro code in the process sees the user's setting.
"""

from __future__ import annotations

import pyro
import torch
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.infer.autoguide.initialization import init_to_uniform
from torch.distributions import constraints, transform_to

from pyrozoo.guides.base import Posterior, bijection, check_start


def _local_params():
    return pyro.settings.context(module_local_params=True)


class _ScopedAutoGuide(Posterior):
    """The parts the two autoguides share: scoped local params and the latent sites of their prototype."""

    def __init__(self, model, latents, **options):
        with _local_params():  # the PyroModule context created here must know its params are local
            super().__init__(latents or model.sample_weights, **options)
            self._setup_prototype()  # at once, from the data-free latents, instead of from the first call
        self._supports = {
            name: site["fn"].support for name, site in self.prototype_trace.iter_stochastic_nodes()
        }

    def __call__(self, *args, **kwargs):
        """Sample every latent; the model's arguments are accepted and ignored."""
        with _local_params():
            return super().__call__(*args, **kwargs)

    def sites(self) -> list[str]:
        return list(self._supports)

    def site_support(self, site: str) -> constraints.Constraint:
        return self._supports[site]

    @staticmethod
    def _store(parameter: torch.Tensor, value: torch.Tensor, where: torch.Tensor | None) -> None:
        # in place, so an optimiser holding the parameter keeps it; entries outside where stay bit for bit
        parameter.copy_(value if where is None else torch.where(where, value, parameter))


class AutoNormalGuide(_ScopedAutoGuide, AutoNormal):
    """Pyro's AutoNormal: a mean-field Normal in unconstrained space, with a Monte Carlo KL.

    Initialised as in the paper (locs uniform in (-2, 2), scales 0.1). Pyro samples it through an auxiliary
    site, so its KL is estimated by Monte Carlo rather than computed analytically.

    :param latents: a data-free callable drawing the latents to cover (default ``model.sample_weights``).
    """

    def __init__(self, model, init_radius: float = 2.0, init_scale: float = 0.1, latents=None):
        check_start(init_radius, init_scale, "autonormal")
        super().__init__(
            model, latents, init_loc_fn=init_to_uniform(radius=init_radius), init_scale=init_scale
        )
        self.start_scale = init_scale  # BMR waits until the scales have moved from it (Posterior.moved)

    def loc_parameter(self, site: str) -> torch.nn.Parameter:
        """The parameter holding ``site``'s locs (an optimiser's group of its own, pyrozoo.lr_units)."""
        return self.get_parameter(f"locs.{site}_unconstrained")

    def site_posterior(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        loc = self.loc_parameter(site)  # locs are unconstrained: the loc itself
        raw_scale = self.get_parameter(f"scales.{site}_unconstrained")
        return loc.detach(), transform_to(self.scale_constraint)(raw_scale).detach()

    def _write(self, site, loc, scale, where) -> None:
        self._store(self.get_parameter(f"locs.{site}_unconstrained"), loc, where)
        raw_scale = transform_to(self.scale_constraint).inv(scale)
        self._store(self.get_parameter(f"scales.{site}_unconstrained"), raw_scale, where)


class AutoDeltaGuide(_ScopedAutoGuide, AutoDelta):
    """Pyro's AutoDelta: MAP point estimates, with no spread (BMR needs spread).

    Locs are initialised uniformly in (-2, 2) (unconstrained). ``posterior()`` gives scale 0 and
    ``write_posterior`` takes only scale 0.

    :param latents: a data-free callable drawing the latents to cover (default ``model.sample_weights``).
    """

    point_mass = True

    def __init__(self, model, init_radius: float = 2.0, latents=None):
        check_start(init_radius, None, "autodelta")
        super().__init__(model, latents, init_loc_fn=init_to_uniform(radius=init_radius))

    def _value(self, site: str) -> tuple[torch.Tensor, object]:
        # AutoDelta keeps each point in its site's constrained space, through transform_to(support)
        raw = self.get_parameter(f"{site}_unconstrained")
        return raw, transform_to(self._supports[site])

    def loc_parameter(self, site: str) -> torch.nn.Parameter:
        """The parameter holding a weight latent's point (its support is the real line, so the parameter is the
        point itself; an optimiser's group of its own, pyrozoo.lr_units)."""
        return self._value(site)[0]

    def site_posterior(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        raw, to_support = self._value(site)
        loc = bijection(self._supports[site]).inv(to_support(raw)).detach()
        return loc, torch.zeros_like(loc)

    def _write(self, site, loc, scale, where) -> None:
        raw, to_support = self._value(site)
        self._store(raw, to_support.inv(bijection(self._supports[site])(loc)), where)

    @torch.no_grad()
    def site_mean(self, site: str) -> torch.Tensor:
        """The point estimate of one latent, read directly: a point mass's mean is its median."""
        raw, to_support = self._value(site)
        return to_support(raw).detach()

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """The point estimates, read directly (Pyro's ``median`` would run the guide)."""
        return self.mean()
