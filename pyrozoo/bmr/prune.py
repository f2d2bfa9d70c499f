"""Thin functional front ends over the reduction objects (:mod:`pyrozoo.bmr.reduction`)."""

from __future__ import annotations

import torch

from pyrozoo.bmr.check import check_posterior
from pyrozoo.bmr.reduction import Reduction, make_reduction
from pyrozoo.bmr.unit_reduction import UnitReduction


def as_reduction(rule: str | Reduction, **options) -> Reduction:
    """A reduction from a registered name and options, or a reduction object as it is."""
    if isinstance(rule, Reduction):
        if options:
            raise TypeError("options go into the reduction object itself, not beside it")
        return rule
    return make_reduction(rule, **options)


@torch.no_grad()
def prune(model, guide, rule: str | Reduction = "threshold", scores: dict | None = None, **options):
    """One reduction pass of every prunable layer: ``rule`` is a name in ``REDUCTIONS`` (with ``options``) or a
    reduction object; masks only ever lose weights. ``scores`` replace a per-weight rule's own (BMR's dF)."""
    reduction = as_reduction(rule, **options)
    check_posterior(model, guide)
    return reduction(model, guide) if scores is None else reduction(model, guide, scores=scores)


def prune_units(model, guide, margin: float = 0.0):
    """Structured BMR: remove whole units whose summed dF exceeds ``margin`` (:class:`UnitReduction`)."""
    check_posterior(model, guide)
    return UnitReduction(margin)(model, guide)


def reduce(model, guide, rule: str | Reduction, units: bool = False, **options):
    """One BMR pass of ``rule`` (with ``options``); ``units=True`` follows it with a structured pass."""
    reduction = as_reduction(rule, **options)
    check_posterior(model, guide)
    return (reduction.then(UnitReduction()) if units else reduction)(model, guide)
