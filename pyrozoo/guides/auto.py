"""Pyro's autoguides with the uniform ``posterior()`` accessor that BMR reads."""

from __future__ import annotations

import torch
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.infer.autoguide.initialization import init_to_uniform
from torch.distributions import biject_to

from pyrozoo.guides.meanfield import constrained_mean


class AutoNormalGuide(AutoNormal):
    """:class:`pyro.infer.autoguide.AutoNormal` (mean-field Normal in unconstrained space), initialised as in
    the paper (locs uniform in ``(-2, 2)``, scales 0.1). Pyro samples it through an auxiliary site, so its KL is
    estimated by Monte Carlo rather than computed analytically."""

    def __init__(self, model, init_radius: float = 2.0, init_scale: float = 0.1):
        super().__init__(model, init_loc_fn=init_to_uniform(radius=init_radius), init_scale=init_scale)

    @torch.no_grad()
    def posterior(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{site: (loc, scale)}`` of every latent, in unconstrained space."""
        return {
            name: tuple(t.detach() for t in self._get_loc_and_scale(name))
            for name, _ in self.prototype_trace.iter_stochastic_nodes()
        }

    @torch.no_grad()
    def mean(self) -> dict[str, torch.Tensor]:
        """Posterior mean of every latent in its own (constrained) space."""
        posterior = self.posterior()
        return {
            name: constrained_mean(*posterior[name], biject_to(site["fn"].support))
            for name, site in self.prototype_trace.iter_stochastic_nodes()
        }


class AutoDeltaGuide(AutoDelta):
    """:class:`pyro.infer.autoguide.AutoDelta` (MAP point estimates), locs initialised uniformly in ``(-2, 2)``."""

    def __init__(self, model, init_radius: float = 2.0):
        super().__init__(model, init_loc_fn=init_to_uniform(radius=init_radius))

    @torch.no_grad()
    def posterior(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{site: (value, 0)}``: a point mass has zero scale (constrained space, as AutoDelta stores it)."""
        medians = self.median()
        return {name: (v.detach(), torch.zeros_like(v)) for name, v in medians.items()}

    def mean(self) -> dict[str, torch.Tensor]:
        """The point estimates."""
        return {name: v.detach() for name, v in self.median().items()}
