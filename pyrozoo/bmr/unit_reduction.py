"""Structured BMR: remove whole units (neurons, channels, embedding dimensions, attention heads) of the coupled
groups that :mod:`pyrozoo.bmr.units` finds in the net's dependency graph.

Removing a unit reduces all its live entries at once: in every layer of its group, its producing rows (or
columns) and its consuming columns (the output layer's too, although single output weights are never pruned).
Under a mean-field posterior dF is additive over entries, so a unit's score is the sum of theirs, the exact joint
evidence gain; the decision on unit scores is the threshold rule. Structures are reduced in order, each on the
masks the previous ones left, so every removal raises the evidence of the model as it then is. Unless
``allow_empty``, the units whose removal the evidence favours least are kept where removing all of them would cut
the net (:mod:`pyrozoo.bmr.livepath`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from pyrozoo.bmr.livepath import Effect, spare, spared_note
from pyrozoo.bmr.reduction import REDUCTIONS, LayerReport, PruneReport, Reduction, score_summary
from pyrozoo.bmr.rules import Threshold
from pyrozoo.bmr.scores import delta_f
from pyrozoo.bmr.units import model_units, pruned_fraction


@REDUCTIONS.register("units")
@dataclass(frozen=True)
class UnitReduction(Reduction):
    """Remove each live unit whose summed dF (producer rows and consumer columns) exceeds ``margin``."""

    margin: float = 0.0
    name: ClassVar[str] = "units"

    @torch.no_grad()
    def __call__(self, model, posterior) -> PruneReport:
        start = time.perf_counter()
        prunable = {layer.name for layer in model.layers if layer.prunable}
        structures = [u for u in model_units(model) if all(m.layer in prunable for m in u.producers)]
        names = {name for u in structures for name in u.layers}
        gains = delta_f(model, posterior, names)
        sites = {layer.name: layer.site for layer in model.layers}
        decision = Threshold(self.margin)
        reports = []
        for units in structures:
            live = {name: model.mask(name).bool() for name in units.layers}
            unit_gain = units.total({name: torch.where(live[name], gains[name], 0.0) for name in live})
            alive = ~units.gone(live)
            remove = alive & ~decision.decide(unit_gain, alive).keep
            # nothing to spare when nothing goes (an Effect costs passes over every group)
            spared = (
                0
                if self.allow_empty or not bool(remove.any())
                else self._spare(model, units, live, remove, unit_gain)
            )
            keep = {name: mask.clone() for name, mask in live.items()}
            units.remove(keep, remove)
            for name in units.layers:
                model.set_mask(name, keep[name])
                posterior.reset_to_prior(sites[name], live[name] & ~keep[name])
            reports.append(
                LayerReport(
                    units.name,
                    sum(int(m.numel()) for m in live.values()),
                    sum(int(m.sum()) for m in live.values()),
                    sum(int(m.sum()) for m in keep.values()),
                    float((alive & ~remove).sum()) / units.count,
                    self.margin,
                    *score_summary(unit_gain, alive),
                    "; ".join(  # said only when the pass removed or spared some, not every epoch of every layer
                        (
                            [f"{int(remove.sum())} of {int(alive.sum())} live units removed"]
                            if remove.any()
                            else []
                        )
                        + ([spared_note(spared, "units")] if spared else [])
                    ),
                )
            )
        return PruneReport(reports, time.perf_counter() - start, pruned_fraction(model))

    @staticmethod
    def _spare(model, units, live: dict, remove: torch.Tensor, gain: torch.Tensor) -> int:
        """Take out of ``remove`` (in place) the fewest units, of lowest summed dF first, whose removal would
        cut the net; returns how many."""
        effect = Effect(model, live)
        order = remove.nonzero().squeeze(1)
        order = order[gain[order].to(torch.float64).argsort(descending=True, stable=True)]

        def cuts(made: torch.Tensor) -> bool:
            chosen = torch.zeros_like(remove)
            chosen[made] = True
            masks = {name: mask.clone() for name, mask in live.items()}
            units.remove(masks, chosen)
            return bool(effect(masks)[0])

        spared = spare(order, cuts)
        remove[spared] = False
        return len(spared)
