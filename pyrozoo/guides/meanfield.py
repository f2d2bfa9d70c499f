"""Our mean-field guide: a Normal per latent entry, sampled as a Normal so the ELBO can use the analytic KL."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn
from torch.distributions import constraints

from pyrozoo.errors import PyrozooError
from pyrozoo.guides.base import Posterior, _base, bijection, check_start, inverse_softplus


class _Normal(dist.Normal):
    """A Normal whose reparameterised sample ``loc + noise * scale`` is one fused multiply-add (one pass over the
    entries and one tensor, where torch's ``rsample`` makes two), built without broadcasting ``loc`` and
    ``scale``, which always have one shape here."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor):
        self.loc, self.scale = loc, scale
        torch.distributions.Distribution.__init__(self, loc.shape)  # checks the arguments if validation is on

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return _Normal(self.loc.expand(batch_shape), self.scale.expand(batch_shape))

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        noise = torch.empty(shape, dtype=self.loc.dtype, device=self.loc.device).normal_()
        return torch.addcmul(self.loc, noise, self.scale)


class MeanFieldNormal(Posterior, nn.Module):
    """Fully factorised Gaussian posterior (ours), sampled as a Normal so the ELBO uses the analytic KL.

    Real-valued latents (the weights' ``z``) get ``N(loc, scale)`` and are sampled as such, so the KL to the
    model's ``N(0, 1)`` prior is analytic. Constrained latents (e.g. a layer's positive precision) get a Normal in
    the unconstrained space pushed through the support's bijection (a log-normal for positive ones).
    ``scale = softplus(raw_scale)`` keeps scales positive without clipping. Implements
    :class:`~pyrozoo.guides.base.Posterior`.

    Usage::

        guide = MeanFieldNormal(model)
        posterior = guide.posterior()   # {site: (loc, scale)} in unconstrained space, for BMR

    :param init_radius: initial locs are drawn uniformly from ``(-init_radius, init_radius)`` (unconstrained).
    :param init_scale: initial scale of every entry.
    :param latents: a data-free callable drawing the latents to cover (default ``model.sample_weights``).
    :param init_locs: ``{site: value}``, initial locs (unconstrained space) that replace the random ones of
        those sites after every site has drawn its own (so the other sites' draws do not change): e.g. a
        layer precision's ``"features.0.precision"``, to start from another run's initial draw.
    """

    def __init__(
        self,
        model,
        init_radius: float = 2.0,
        init_scale: float = 0.1,
        latents=None,
        init_locs: dict[str, float] | None = None,
    ):
        super().__init__()
        check_start(init_radius, init_scale, "meanfield")
        self.start_scale = init_scale  # BMR waits until the scales have moved from it (Posterior.moved)
        with poutine.block():  # trace the prior without letting outer handlers (an ELBO's trace) see it
            prototype = poutine.trace(latents or model.sample_weights).get_trace()
        self.locs = nn.ParameterDict()
        self.raw_scales = nn.ParameterDict()
        # site -> (parameter key, support, event dim, map onto the support or None for real latents)
        self._sites: dict[str, tuple[str, constraints.Constraint, int, object]] = {}
        for name, site in prototype.iter_stochastic_nodes():
            support = site["fn"].support
            transform = bijection(support)
            key = name.replace(".", "-")  # parameter names cannot hold dots
            loc = torch.empty_like(transform.inv(site["value"].detach())).uniform_(-init_radius, init_radius)
            self.locs[key] = nn.Parameter(loc)
            self.raw_scales[key] = nn.Parameter(torch.full_like(loc, math.log(math.expm1(init_scale))))
            # real latents are sampled as a plain Normal (no transform), so the KL to N(0, 1) stays analytic;
            # the cache spares recomputing the inverse map when the ELBO scores a sample
            real = _base(support) is constraints.real
            event_dim = site["fn"].event_dim
            self._sites[name] = (key, support, event_dim, None if real else transform.with_cache(1))
        for name, value in (init_locs or {}).items():
            if name not in self._sites:
                raise PyrozooError(
                    f"init_locs: the model has no latent {name!r}; its latents: {', '.join(self._sites)}"
                )
            with torch.no_grad():
                self.locs[self._sites[name][0]].fill_(float(value))

    def __getstate__(self):
        # the transforms' one-value caches may hold a non-leaf tensor of the last step, which deepcopy refuses
        state = dict(self.__dict__)
        state["_sites"] = {
            name: (key, support, event_dim, None if transform is None else bijection(support).with_cache(1))
            for name, (key, support, event_dim, transform) in self._sites.items()
        }
        return state

    def _distribution(self, name: str):
        key, _, event_dim, transform = self._sites[name]
        base = _Normal(self.locs[key], F.softplus(self.raw_scales[key])).to_event(event_dim)
        return base if transform is None else dist.TransformedDistribution(base, transform)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Sample every latent (the model's arguments are accepted and ignored)."""
        return {name: pyro.sample(name, self._distribution(name)) for name in self._sites}

    def sites(self) -> list[str]:
        return list(self._sites)

    def site_support(self, site: str) -> constraints.Constraint:
        return self._sites[site][1]

    def loc_parameter(self, site: str) -> nn.Parameter:
        """The parameter holding ``site``'s locs (an optimiser's group of its own, pyrozoo.lr_units)."""
        return self.locs[self._sites[site][0]]

    def site_posterior(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._sites[site][0]
        return self.locs[key].detach(), F.softplus(self.raw_scales[key]).detach()

    @torch.no_grad()
    def resize(self, resize_site) -> dict[nn.Parameter, tuple[nn.Parameter, str]]:
        """Compaction (:mod:`pyrozoo.bmr.compact`): each site's loc and raw scale become
        ``resize_site(site, tensor, fill)`` (new entries, when growing, at the prior N(0, 1)); returns
        ``{old parameter: (new parameter, site)}`` for those that changed, so an optimiser can follow."""
        moved = {}
        prior_raw = float(inverse_softplus(torch.tensor(1.0)))
        for site, (key, *_) in self._sites.items():
            for table, fill in ((self.locs, 0.0), (self.raw_scales, prior_raw)):
                old = table[key]
                value = resize_site(site, old.detach(), fill)
                if value.shape != old.shape:
                    table[key] = nn.Parameter(value.contiguous().clone())
                    moved[old] = (table[key], site)
        return moved

    def _write(self, site, loc, scale, where) -> None:
        key = self._sites[site][0]
        raw = inverse_softplus(scale)
        if where is not None:  # entries outside where keep their stored values bit for bit
            loc, raw = torch.where(where, loc, self.locs[key]), torch.where(where, raw, self.raw_scales[key])
        self.locs[key].copy_(loc)
        self.raw_scales[key].copy_(raw)
