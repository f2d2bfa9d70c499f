"""Bayesian model reduction: closed forms, pruning rules, masks and the rebuilt sparse net."""

from __future__ import annotations

from pyrozoo.bmr.prune import PruneReport, prune, pruned_fraction
from pyrozoo.bmr.rebuild import rebuild
from pyrozoo.bmr.rules import RULES

REDUCTIONS = [*RULES, "horseshoe"]


def reduce(model, guide, rule: str, **options) -> PruneReport:
    """One BMR pass: a per-weight rule on dF (``RULES``), or ``"horseshoe"`` (BMR-RHS); ``options`` go to it."""
    if rule == "horseshoe":
        from pyrozoo.bmr.horseshoe import prune_horseshoe

        return prune_horseshoe(model, guide, **options)
    return prune(model, guide, rule, **options)


__all__ = ["PruneReport", "REDUCTIONS", "prune", "pruned_fraction", "rebuild", "reduce"]
