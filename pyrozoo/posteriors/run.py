"""The run's own posterior: the guide it trained, pruned in place and kept in ``pruned.pt`` beside the
checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from pyrozoo.posteriors.base import PosteriorSource, Pruned, headline, register_posterior
from pyrozoo.runfolder import PRUNED


@register_posterior("run")
@dataclass(frozen=True)
class RunPosterior(PosteriorSource):
    """The run's own posterior, its trained guide (a point-mass run's has no spread for BMR)."""

    file = PRUNED

    def unavailable(self, run) -> str | None:
        if run.guide.point_mass:
            return f"a posterior with spread; {run.out} is a point-mass ({run.config.method}) run"
        return None

    def fit(self, run, progress: bool = True):
        """The run's own model and guide, not copies: pruning them prunes the run."""
        return run.model, run.guide

    def prune(self, run, reduction, progress: bool = True) -> Pruned:
        before = run.evaluate()
        report = reduction(run.model, run.guide)
        after = run.evaluate()
        run.save_pruned(report, after)
        line = (
            f"{headline(run, reduction)} (step {run.step}): {report.seconds * 1e3:.1f} ms, pruned fraction "
            f"{report.pruned_fraction:.4f}; state written to {run.out / self.file}"
        )
        return Pruned(report, before, after, line)

    def load_pruned(self, run) -> None:
        run.load_pruned()  # refused if it was pruned from an older checkpoint, or is not there
