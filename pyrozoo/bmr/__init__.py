"""Bayesian model reduction: closed forms, pruning rules, masks and the rebuilt sparse net."""

from __future__ import annotations

from pyrozoo.bmr.prune import PruneReport, prune, prune_units, pruned_fraction
from pyrozoo.bmr.rebuild import rebuild
from pyrozoo.bmr.rules import RULES

REDUCTIONS = [*RULES, "units", "horseshoe"]


def reduce(model, guide, rule: str, units: bool = False, **options) -> PruneReport:
    """One BMR pass: a per-weight rule on dF (``RULES``), ``"units"`` (whole units, :func:`prune_units`), or
    ``"horseshoe"`` (BMR-RHS); ``options`` go to it. ``units=True`` follows the pass with a structured one."""
    if rule == "units":
        return prune_units(model, guide, **options)
    if rule == "horseshoe":
        from pyrozoo.bmr.horseshoe import prune_horseshoe

        report = prune_horseshoe(model, guide, **options)
    else:
        report = prune(model, guide, rule, **options)
    if units:
        structured = prune_units(model, guide)
        report = PruneReport(
            report.layers + structured.layers,
            report.seconds + structured.seconds,
            structured.pruned_fraction,
        )
    return report


__all__ = ["PruneReport", "REDUCTIONS", "prune", "prune_units", "pruned_fraction", "rebuild", "reduce"]
