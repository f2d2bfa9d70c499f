"""BMR-RHS (docs/method.md#horseshoe): a regularised horseshoe fitted to the evidence gains, without data.

The summed reduction ``sum_k dF(mu_k, pi_k, g2 = gamma_k(h)^2)`` is a log-likelihood of horseshoe
hyperparameters ``h`` (the tiered prior's, one scale per output row): it says how much the evidence would gain if
weight k's N(0, 1) prior (on its latent z) were shrunk to N(0, gamma_k^2). A mean-field guide over ``h`` is fitted
by SVI on that factor alone; each weight's prior is then shrunk by ``r_k = E[gamma_k^-2]^-1/2`` (written into the
model's mask as a multiplier), its posterior replaced by the exact reduced one, and weights with ``r_k`` below
``delta`` pruned. A layer the fit would empty is left as it was and flagged, and where the others' removals would
still cut the net the live-path guard (:mod:`pyrozoo.bmr.livepath`) leaves the fewest, least shrunk, weights as
they were: the reference implementation of this method is known to collapse, and a silently empty network would
be worse than no reduction.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import ClassVar

import pyro
import torch
from pyro import poutine

from pyrozoo.bmr.delta_f import meanfield
from pyrozoo.bmr.livepath import keep_live_path, spared_note
from pyrozoo.bmr.reduction import REDUCTIONS, LayerReport, PruneReport, Reduction
from pyrozoo.bmr.scores import Z_PRIOR_VAR
from pyrozoo.bmr.units import pruned_fraction
from pyrozoo.elbo import negative_elbo
from pyrozoo.errors import PyrozooError
from pyrozoo.guides.meanfield import MeanFieldNormal
from pyrozoo.models.priors import tiered


def _reduced_var(scale) -> torch.Tensor:
    """gamma^2 as a reduced prior variance of z: shrinking only, since a prior wider than the full N(0, 1) is
    not a reduction."""
    return torch.as_tensor(scale).square().clamp(max=Z_PRIOR_VAR)


class _EvidenceModel:
    """Pyro model over horseshoe hyperparameters whose only 'data' is the posterior of the weights."""

    def __init__(self, layers, posterior: dict, masks: dict, tau0: float):
        self.layers = layers
        self.prior = functools.partial(tiered, tau0=tau0)
        self.posterior, self.masks = posterior, masks

    def scales(self) -> dict:
        return {layer.name: self.prior(layer) for layer in self.layers}

    def __call__(self):
        for layer, scale in zip(self.layers, self.scales().values()):
            loc, precision = self.posterior[layer.name]
            g2 = _reduced_var(scale).expand(layer.shape)
            gain = meanfield(loc, precision, Z_PRIOR_VAR, g2).delta_f
            pyro.factor(f"{layer.name}.delta_f", (gain * self.masks[layer.name]).sum())


@REDUCTIONS.register("horseshoe")
@dataclass(frozen=True)
class Horseshoe(Reduction):
    """BMR-RHS: fit the horseshoe (global scale ``tau0``) to dF by ``steps`` of SVI at ``lr``, shrink every
    prunable layer by ``samples`` draws of the fit, and prune weights shrunk below ``delta``."""

    tau0: float = 1e-2
    steps: int = 1000
    lr: float = 5e-2
    samples: int = 100
    delta: float = 1e-6
    name: ClassVar[str] = "horseshoe"

    def __post_init__(self):
        # steps=0 would prune by the horseshoe's random start, fitted to nothing
        if not (self.tau0 > 0 and self.lr > 0 and self.samples >= 1 and self.steps >= 1 and self.delta >= 0):
            raise PyrozooError(
                f"horseshoe: tau0 and lr must be positive, samples and steps at least 1, delta not negative; "
                f"got {self.describe()}"
            )

    def __call__(self, model, posterior) -> PruneReport:
        return prune_horseshoe(
            model, posterior, self.tau0, self.steps, self.lr, self.samples, self.delta, self.allow_empty
        )


def prune_horseshoe(
    model,
    guide,
    tau0: float = 1e-2,
    steps: int = 1000,
    lr: float = 5e-2,
    samples: int = 100,
    delta: float = 1e-6,
    allow_empty: bool = False,
) -> PruneReport:
    """Fit the horseshoe to dF, shrink and prune every prunable layer; masks only ever shrink. A layer is never
    emptied, nor the net cut, unless ``allow_empty``: the weights it would take are left as they were."""
    if guide.point_mass:
        raise PyrozooError(f"BMR-RHS needs a posterior with spread; {type(guide).__name__} is a point mass")
    start = time.perf_counter()
    layers = [layer for layer in model.layers if layer.prunable]
    full = guide.posterior()
    with torch.no_grad():
        posterior = {layer.name: (full[layer.site][0], full[layer.site][1].pow(-2)) for layer in layers}
        masks = {layer.name: model.mask(layer.name).clone() for layer in layers}
    evidence = _EvidenceModel(layers, posterior, {k: (m != 0).to(m.dtype) for k, m in masks.items()}, tau0)
    shrinks = _fit_shrinks(evidence, steps, lr, samples)
    with torch.no_grad():
        news, notes = _shrunk_masks(model, layers, masks, shrinks, delta, allow_empty)
        reports = [
            _write_layer(
                model,
                guide,
                layer,
                full[layer.site],
                shrinks[layer.name],
                masks[layer.name],
                news[layer.name],
                delta,
                notes.get(layer.name, ""),
            )
            for layer in layers
        ]
    return PruneReport(reports, time.perf_counter() - start, pruned_fraction(model))


def _fit_shrinks(evidence: _EvidenceModel, steps: int, lr: float, samples: int) -> dict[str, torch.Tensor]:
    """Fit the horseshoe to dF by ``steps`` of SVI and return each layer's shrink ``r = E[gamma^-2]^-1/2``
    over ``samples`` draws, in a seeded random stream of its own (training's is left as it was)."""
    with poutine.block(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hyper_guide = MeanFieldNormal(evidence, init_radius=0.0, latents=evidence.scales)
        optimizer = torch.optim.Adam(hyper_guide.parameters(), lr=lr)
        for _ in range(steps):
            loss = negative_elbo(evidence, hyper_guide)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            inverse = {layer.name: 0.0 for layer in evidence.layers}
            for _ in range(samples):
                scales = poutine.condition(evidence.scales, data=hyper_guide())()
                for name, scale in scales.items():
                    inverse[name] = inverse[name] + _reduced_var(scale).reciprocal()
    with torch.no_grad():
        return {
            layer.name: (inverse[layer.name] / samples).rsqrt().expand(layer.shape)
            for layer in evidence.layers
        }


def _shrunk_masks(model, layers, masks: dict, shrinks: dict, delta: float, allow_empty: bool):
    """The new mask multipliers (``masks`` times the shrinks, 0 below ``delta``) and a note per layer; unless
    ``allow_empty``, a layer the fit would empty, and the weights whose removal would cut the net, stay as
    they were."""
    news, notes = {}, {}
    for layer in layers:
        old, shrink = masks[layer.name], shrinks[layer.name]
        news[layer.name] = torch.where(shrink < delta, 0.0, old * shrink)
        if not allow_empty and bool((old != 0).any()) and not bool((news[layer.name] != 0).any()):
            news[layer.name] = old
            notes[layer.name] = "collapse guarded: the fit would prune every weight; layer left as it was"
    if not allow_empty:  # and no layer cut through the units that die with the others' weights
        keep = {name: new != 0 for name, new in news.items()}
        scores = {name: -shrink for name, shrink in shrinks.items()}  # the most shrunk go first
        spared = keep_live_path(model, {name: old != 0 for name, old in masks.items()}, keep, scores)
        for name, count in spared.items():
            news[name] = torch.where(keep[name] & (news[name] == 0), masks[name], news[name])
            notes[name] = "; ".join(filter(None, [notes.get(name), spared_note(count)]))
    return news, notes


def _write_layer(
    model, guide, layer, loc_scale: tuple, shrink, old, new, delta: float, note: str
) -> LayerReport:
    """Set one layer's new mask and the exact reduced posterior of its changed weights (the pruned reset to
    the prior, ``loc_scale`` the full posterior); returns its report row."""
    loc, scale = loc_scale
    precision = scale.pow(-2)
    reduced = meanfield(loc, precision, Z_PRIOR_VAR, shrink.square())
    # z's prior becomes N(0, 1) again under the new multiplier: rescale the reduced posterior by 1/shrink
    live = new != 0
    changed = live & (new != old)
    guide.write_posterior(
        layer.site,
        torch.where(changed, reduced.mean / shrink, loc),
        torch.where(changed, (reduced.precision * shrink.square()).rsqrt(), scale),
    )
    guide.reset_to_prior(layer.site, ~live)
    model.set_mask(layer.name, new)
    log_shrink = shrink[old != 0].log10() if bool((old != 0).any()) else torch.zeros(1)
    return LayerReport(
        layer.name,
        old.numel(),
        int((old != 0).sum()),
        int(live.sum()),
        float(live.float().mean()),
        delta,
        float(log_shrink.min()),
        float(log_shrink.median()),
        float(log_shrink.max()),
        note,
    )
