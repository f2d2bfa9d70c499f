"""The diagonal Laplace posterior around a run's point estimate (:mod:`pyrozoo.posteriors.laplace`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pyrozoo.errors import PyrozooError
from pyrozoo.posteriors.base import FittedSource, register_posterior
from pyrozoo.posteriors.laplace import NOISES, laplace_from_run
from pyrozoo.posteriors.linearised import check_predictive


@register_posterior("laplace-diag")
@dataclass(frozen=True)
class LaplaceDiag(FittedSource):
    """A diagonal Laplace approximation around the run's point estimate (a flat-map run's MAP weights, say),
    fitted on its training set, each layer's prior precision chosen by the Laplace evidence.

    ``fit_size`` estimates the curvature from that many training inputs drawn at random (default: all);
    ``predictive`` is how ``predict`` and ``uncertainty`` use it: ``glm``, the linearised net (default), or
    ``samples``, the net at sampled weights; ``noise``, a regression's: ``evidence`` (chosen by the Laplace
    evidence, default) or ``run`` (the run's own)."""

    fit_size: int | None = None
    predictive: str = "glm"
    noise: str = "evidence"
    structure: ClassVar[str] = "diag"  # the curvature's (pyrozoo.posteriors.laplace.STRUCTURES)

    def __post_init__(self):
        if self.fit_size is not None and not self.fit_size > 0:
            raise PyrozooError(f"{self.name}: fit_size is a positive number of inputs, got {self.fit_size}")
        check_predictive(self.predictive)
        if self.noise not in NOISES:
            raise PyrozooError(f"{self.name}: noise is one of {', '.join(NOISES)}, not {self.noise!r}")

    def fit(self, run, progress: bool = True):
        return laplace_from_run(
            run,
            self.structure,
            progress=progress,
            fit_size=self.fit_size,
            noise=self.noise,
            predictive=self.predictive,
        )

    def summary(self, model) -> str:
        noise = (
            f"; noise precision {float(model.likelihood.precision()):.3g}"
            if model.likelihood.task == "regress"
            else ""
        )
        return (
            "prior precisions by the Laplace evidence: "
            + ", ".join(f"{r['layer']} {r['prior_precision']:.3g}" for r in model.laplace)
            + noise
        )

    def record(self, model) -> dict:
        return {"laplace": model.laplace}
