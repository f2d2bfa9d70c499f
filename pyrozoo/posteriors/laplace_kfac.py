"""The KFAC Laplace posterior around a run's point estimate (:mod:`pyrozoo.posteriors.laplace`), whose correlations
write the reduced mean back into the surviving weights (:mod:`pyrozoo.bmr.kfac`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pyrozoo.posteriors.base import Variant, register_posterior
from pyrozoo.posteriors.laplace_diag import LaplaceDiag


@register_posterior("laplace-kfac")
@dataclass(frozen=True)
class LaplaceKFAC(LaplaceDiag):
    """A Kronecker-factored (KFAC) Laplace approximation around the run's point estimate, fitted on its training
    set; pruning writes back the reduced mean, so the surviving weights compensate.

    Its options are the diagonal one's (:class:`~pyrozoo.posteriors.laplace_diag.LaplaceDiag`)."""

    structure: ClassVar[str] = "kron"
    variants: ClassVar[dict[str, Variant]] = {
        "nowb": Variant("the survivors kept as trained (what write-back adds)", write_back=False),
        # the diagonal GGN is exact on the diagonal, where KFAC's marginal variances are only approximate:
        # measured to rank better (experiments/RESULTS.md)
        "diagdf": Variant(
            "ranked by the diagonal Laplace's dF, KFAC's reduced mean written back", ranked_by=LaplaceDiag
        ),
    }
