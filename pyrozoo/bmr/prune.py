"""Pruning: read the guide's posterior, compute dF per weight, apply a rule, write the masks into the model."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import pandas as pd
import torch
from pyro import poutine

from pyrozoo.bmr.delta_f import point_mass_meanfield
from pyrozoo.bmr.rules import get_rule
from pyrozoo.bmr.units import effective_masks, find_units
from pyrozoo.errors import PyrozooError

# Every weight latent z has the model's standard-normal prior (non-centred form, w = scale * mask * z), so
# reducing a weight to zero is reducing N(0, 1) on z to a point mass: BMR never needs the layer scale.
Z_PRIOR_VAR = 1.0


@dataclass
class LayerReport:
    layer: str
    size: int  # entries of the layer's latent (weights and bias)
    live_before: int
    kept: int
    inclusion: float  # the rule's estimate of the fraction worth keeping
    cutoff: float  # score (dF for BMR) above which weights were pruned
    score_min: float  # over the live weights
    score_median: float
    score_max: float
    note: str = ""  # e.g. a guard that stopped the reduction


@dataclass
class PruneReport:
    layers: list[LayerReport]
    seconds: float
    pruned_fraction: float

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self.layers])


def delta_f(model, guide, layers=None) -> dict[str, torch.Tensor]:
    """dF of removing each weight of each prunable layer (or of ``layers``), ``{layer: tensor like its latent}``."""
    posterior = guide.posterior()
    out = {}
    for layer in model.layers:
        if not (layer.prunable if layers is None else layer.name in layers):
            continue
        loc, scale = posterior[layer.site]
        if not bool((scale > 0).all()):
            raise PyrozooError(
                f"BMR needs a posterior with spread; {type(guide).__name__} gives {layer.site} a "
                f"point mass (train with a mean-field method such as flat-ff or bmr-ss)"
            )
        out[layer.name] = point_mass_meanfield(loc, scale.pow(-2), Z_PRIOR_VAR)
    return out


def pruned_fraction(model) -> float:
    """Pruned entries over prunable entries (PAPER.md §6), counting the outgoing weights of dead units."""
    masks = effective_masks(model)
    prunable = [layer for layer in model.layers if layer.prunable]
    total = sum(layer.shape.numel() for layer in prunable)
    kept = sum(int(masks[layer.name].sum()) for layer in prunable)
    return 1.0 - kept / total


@torch.no_grad()
def posterior_scales(model, guide, samples: int = 100) -> dict[str, torch.Tensor]:
    """Posterior mean of each layer's prior scale (``w = scale * mask * z``), e.g. the horseshoe's shrinkage
    ``E[gamma_r]`` per row, by Monte Carlo over ``samples`` draws of the guide."""
    total: dict[str, torch.Tensor] = {}
    with poutine.block():
        for _ in range(samples):
            latents = guide()
            for layer in model.layers:
                scale = poutine.condition(model.prior, data=latents)(layer)
                total[layer.name] = total.get(layer.name, 0) + torch.as_tensor(scale).expand(
                    layer.shape[0], 1
                )
    return {name: value / samples for name, value in total.items()}


def scale_table(scales: dict[str, torch.Tensor]) -> pd.DataFrame:
    """One row per layer: mean, smallest and largest posterior-mean scale over its output rows."""
    return pd.DataFrame(
        [
            {
                "layer": name,
                "mean_scale": float(s.mean()),
                "min_scale": float(s.min()),
                "max_scale": float(s.max()),
            }
            for name, s in scales.items()
        ]
    )


def shrinkage_scores(model, scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores for :func:`prune` from posterior-mean scales: ``-scale`` per weight, so that the ``threshold``
    rule with ``margin=-T`` prunes the rows whose scale is below ``T`` (a hierarchical prior's own verdict,
    turned into masks to compare its sparsity with BMR's)."""
    return {layer.name: -scales[layer.name].expand(layer.shape) for layer in model.layers if layer.prunable}


@torch.no_grad()
def prune(
    model, guide, rule="spike-and-slab", scores: dict[str, torch.Tensor] | None = None, **rule_options
) -> PruneReport:
    """Bayesian model reduction of every prunable layer; masks only ever lose weights.

    ``rule`` is a name from :data:`pyrozoo.bmr.rules.RULES` or a function ``(scores, live) -> Decision``; the
    scores are BMR's dF unless ``scores`` gives others (e.g. :func:`shrinkage_scores`).
    Pruned entries of a guide that supports it (``reset_to_prior``) are set to the prior N(0, 1), which is their
    exact posterior once the weight no longer touches the likelihood. Under a mean-field posterior the surviving
    weights' reduced posterior equals their full one, so nothing else changes.
    """
    start = time.perf_counter()
    decide = get_rule(rule) if isinstance(rule, str) else rule
    reports = []
    gains = delta_f(model, guide) if scores is None else scores
    for layer in model.layers:
        if layer.name not in gains:
            continue
        df = gains[layer.name]
        live = model.mask(layer.name).bool()
        decision = decide(df, live, **rule_options)
        model.set_mask(layer.name, decision.keep)
        if hasattr(guide, "reset_to_prior"):
            guide.reset_to_prior(layer.site, ~decision.keep)
        live_df = df[live] if bool(live.any()) else torch.zeros(1)
        reports.append(
            LayerReport(
                layer.name,
                live.numel(),
                int(live.sum()),
                int(decision.keep.sum()),
                decision.inclusion,
                decision.cutoff,
                float(live_df.min()),
                float(live_df.median()),
                float(live_df.max()),
            )
        )
    return PruneReport(reports, time.perf_counter() - start, pruned_fraction(model))


@torch.no_grad()
def prune_units(model, guide, margin: float = 0.0) -> PruneReport:
    """Structured BMR: remove whole units (neurons, channels, attention heads; :mod:`pyrozoo.bmr.units`).

    Removing a unit reduces all its live entries at once: its producer rows and its consumer columns (the output
    layer's too, although single output weights are never pruned). Under a mean-field posterior dF is additive
    over entries, so a unit's dF is the sum of theirs; a unit goes iff that sum exceeds ``margin``. Structures
    are reduced in order, each on the masks the previous ones left, so every removal raises the evidence of the
    model as it then is.
    """
    start = time.perf_counter()
    structures = [u for u in find_units(model.net, model.layers) if u.producer.prunable]
    gains = delta_f(model, guide, {name for u in structures for name in (u.producer.name, u.consumer.name)})
    reports = []
    for units in structures:
        producer, consumer = units.producer.name, units.consumer.name
        live_in, live_out = model.mask(producer).bool(), model.mask(consumer).bool()
        gain_in = torch.where(live_in, gains[producer], 0.0)[units.rows].flatten(1).sum(1)
        gain_out = torch.where(live_out, gains[consumer], 0.0)[:, units.columns].sum(dim=(0, 2))
        unit_gain = gain_in + gain_out
        alive = ~units.dead(live_in)
        remove = alive & (unit_gain > margin)
        keep_in, keep_out = live_in.clone(), live_out.clone()
        keep_in[units.rows[remove].flatten()] = False
        keep_out[:, units.columns[remove].flatten()] = False
        for layer, keep, live in ((units.producer, keep_in, live_in), (units.consumer, keep_out, live_out)):
            model.set_mask(layer.name, keep)
            if hasattr(guide, "reset_to_prior"):
                guide.reset_to_prior(layer.site, live & ~keep)
        scores = unit_gain[alive] if bool(alive.any()) else torch.zeros(1)
        reports.append(
            LayerReport(
                producer,
                live_in.numel(),
                int(live_in.sum()),
                int(keep_in.sum()),
                float((alive & ~remove).sum()) / units.count,
                margin,
                float(scores.min()),
                float(scores.median()),
                float(scores.max()),
                f"{int(remove.sum())} of {int(alive.sum())} live units removed",
            )
        )
    return PruneReport(reports, time.perf_counter() - start, pruned_fraction(model))
