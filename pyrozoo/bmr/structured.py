"""Structured BMR: remove whole units (neurons, channels, attention heads; :mod:`pyrozoo.bmr.units`).

Removing a unit reduces all its live entries at once: its producer rows and its consumer columns (the output
layer's too, although single output weights are never pruned). Under a mean-field posterior dF is additive over
entries, so a unit's score is the sum of theirs, the exact joint evidence gain; the decision on unit scores is
the threshold rule. Structures are reduced in order, each on the masks the previous ones left, so every removal
raises the evidence of the model as it then is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from pyrozoo.bmr.reduction import REDUCTIONS, LayerReport, PruneReport, Reduction, score_summary
from pyrozoo.bmr.rules import Threshold
from pyrozoo.bmr.scores import delta_f
from pyrozoo.bmr.units import find_units, pruned_fraction


@REDUCTIONS.register("units")
@dataclass(frozen=True)
class Units(Reduction):
    """Remove each live unit whose summed dF (producer rows and consumer columns) exceeds ``margin``."""

    margin: float = 0.0
    name: ClassVar[str] = "units"

    @torch.no_grad()
    def __call__(self, model, posterior) -> PruneReport:
        start = time.perf_counter()
        structures = [u for u in find_units(model.net, model.layers) if u.producer.prunable]
        names = {name for u in structures for name in (u.producer.name, u.consumer.name)}
        gains = delta_f(model, posterior, names)
        decision = Threshold(self.margin)
        reports = []
        for units in structures:
            producer, consumer = units.producer.name, units.consumer.name
            live_in, live_out = model.mask(producer).bool(), model.mask(consumer).bool()
            gain_in = torch.where(live_in, gains[producer], 0.0)[units.rows].flatten(1).sum(1)
            gain_out = torch.where(live_out, gains[consumer], 0.0)[:, units.columns].sum(dim=(0, 2))
            unit_gain = gain_in + gain_out
            alive = ~units.dead(live_in)
            remove = alive & ~decision.decide(unit_gain, alive).keep
            keep_in, keep_out = live_in.clone(), live_out.clone()
            keep_in[units.rows[remove].flatten()] = False
            keep_out[:, units.columns[remove].flatten()] = False
            for layer, keep, live in (
                (units.producer, keep_in, live_in),
                (units.consumer, keep_out, live_out),
            ):
                model.set_mask(layer.name, keep)
                posterior.reset_to_prior(layer.site, live & ~keep)
            reports.append(
                LayerReport(
                    producer,
                    live_in.numel(),
                    int(live_in.sum()),
                    int(keep_in.sum()),
                    float((alive & ~remove).sum()) / units.count,
                    self.margin,
                    *score_summary(unit_gain, alive),
                    f"{int(remove.sum())} of {int(alive.sum())} live units removed",
                )
            )
        return PruneReport(reports, time.perf_counter() - start, pruned_fraction(model))
