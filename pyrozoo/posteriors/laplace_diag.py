"""The diagonal Laplace posterior around a run's point estimate (:mod:`pyrozoo.posteriors.laplace`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pyrozoo.errors import PyrozooError
from pyrozoo.posteriors.base import FittedSource, register_posterior
from pyrozoo.posteriors.laplace import laplace_from_run


@register_posterior("laplace-diag")
@dataclass(frozen=True)
class LaplaceDiag(FittedSource):
    """A diagonal Laplace approximation around the run's point estimate (a flat-map run's MAP weights, say),
    fitted on its training set, each layer's prior precision chosen by the Laplace evidence.

    ``fit_size`` estimates the curvature from that many training inputs drawn at random (default: all)."""

    fit_size: int | None = None
    structure: ClassVar[str] = "diag"  # the curvature's (pyrozoo.posteriors.laplace.STRUCTURES)

    def __post_init__(self):
        if self.fit_size is not None and not self.fit_size > 0:
            raise PyrozooError(f"{self.name}: fit_size is a positive number of inputs, got {self.fit_size}")

    def fit(self, run, progress: bool = True):
        return laplace_from_run(run, self.structure, progress=progress, fit_size=self.fit_size)

    def summary(self, model) -> str:
        return "prior precisions by the Laplace evidence: " + ", ".join(
            f"{r['layer']} {r['prior_precision']:.3g}" for r in model.laplace
        )

    def record(self, model) -> dict:
        return {"laplace": model.laplace}
