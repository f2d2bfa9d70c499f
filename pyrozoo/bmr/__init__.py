"""Bayesian model reduction: closed forms, scores, reductions (decision x scope), masks and the rebuilt net.

Every reduction is registered in :data:`REDUCTIONS` (importing a module registers what it defines).
"""

from __future__ import annotations

from pyrozoo.bmr.reduction import (
    REDUCTIONS,
    PruneReport,
    Reduction,
    Sequence,
    WeightReduction,
    make_reduction,
)
from pyrozoo.bmr.rules import Shrinkage, SpikeAndSlab, Threshold
from pyrozoo.bmr.unit_reduction import UnitReduction
from pyrozoo.bmr.horseshoe import Horseshoe
from pyrozoo.bmr.sparsity import TargetSparsity
from pyrozoo.bmr.prune import prune, prune_units, reduce
from pyrozoo.bmr.rebuild import rebuild
from pyrozoo.bmr.units import pruned_fraction

__all__ = [
    "REDUCTIONS",
    "Horseshoe",
    "PruneReport",
    "Reduction",
    "Sequence",
    "Shrinkage",
    "SpikeAndSlab",
    "TargetSparsity",
    "Threshold",
    "UnitReduction",
    "WeightReduction",
    "make_reduction",
    "prune",
    "prune_units",
    "pruned_fraction",
    "rebuild",
    "reduce",
]
