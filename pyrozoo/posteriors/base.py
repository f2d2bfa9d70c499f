"""What a posterior source is: the registry, the one interface, and the shared half of every source fitted after
training.

A source turns a finished run folder into the posterior BMR reads (:meth:`PosteriorSource.fit`: a model and a
:class:`~pyrozoo.guides.base.Posterior`, whose ``posterior()`` gives each site's loc and scale and which may keep
more, as a KFAC posterior keeps its Kronecker factors to write back reduced means), prunes the run from it into
one file of the run folder (:attr:`PosteriorSource.file`) and loads that file again for ``export``, ``predict``
and ``uncertainty``. The commands take sources by their registered name and read nothing else about them.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from torch import nn

from pyrozoo.errors import PyrozooError, reason
from pyrozoo.io import atomic_write, save_torch
from pyrozoo.options import build_with_options
from pyrozoo.registry import Registry, option_names
from pyrozoo.torchfile import load_tensors

POSTERIORS = Registry("posterior source")


def register_posterior(name: str):
    """Class decorator: register a :class:`PosteriorSource` under ``name``, which it keeps as ``cls.name``."""

    def add(cls):
        cls.name = name
        return POSTERIORS.register(name, cls)

    return add


def make_source(name: str, options: dict | None = None, **shared) -> "PosteriorSource":
    """The registered source ``name``. ``options`` are its own, each checked against its fields (one it does not
    take is an error naming those it does); ``shared`` reach it where it takes them and they are not None, as
    ``--fit-size`` reaches the sources that fit a curvature and no other."""
    cls = POSTERIORS[name]
    takes = option_names(cls)
    given = {k: v for k, v in shared.items() if k in takes and v is not None}
    return build_with_options(f"posterior source {name!r}", cls, {**given, **(options or {})})


@dataclass(frozen=True)
class Variant:
    """A further sweep method of a source, ``bmr-NAME-SUFFIX``: BMR without writing back the reduced mean
    (``write_back=False``), or ranked by another source's dF (``ranked_by``, a source class)."""

    about: str
    write_back: bool = True
    ranked_by: type | None = None


@dataclass
class Pruned:
    """What :meth:`PosteriorSource.prune` did: the report, the test metrics before and after, and one line
    saying what was pruned and where it was written."""

    report: object
    before: dict
    after: dict
    line: str
    before_label: str = "before"


class PosteriorSource(ABC):
    """Where BMR's posterior comes from. Subclasses are dataclasses whose fields are their options; ``file`` is
    what ``pyrozoo prune RUN --posterior NAME`` writes into the run folder."""

    name: ClassVar[str]
    file: str
    variants: ClassVar[dict[str, Variant]] = {}

    def unavailable(self, run) -> str | None:
        """Why this source cannot give ``run`` a posterior BMR can use (``"a posterior with spread; ..."``), or
        None."""
        return None

    @abstractmethod
    def fit(self, run, progress: bool = True):
        """``(model, posterior)`` for BMR from the finished ``run``."""

    @abstractmethod
    def prune(self, run, reduction, progress: bool = True) -> Pruned:
        """Prune ``run`` with ``reduction`` from this posterior and write :attr:`file` into its folder."""

    @abstractmethod
    def load_pruned(self, run) -> tuple[nn.Module, nn.Module] | None:
        """Read back what :meth:`prune` wrote (refused when it is stale, corrupt or missing): the pruned plain
        net in its trained shapes and with dead units cut, or None when the pruned state was loaded into the
        run's own model and guide (then sampled as the run's posterior)."""


def headline(run, reduction) -> str:
    """The start of every source's line about a prune: what pruned which run at which epoch."""
    return f"pruning ({reduction.describe()}) of {run.out} after epoch {run.epoch}"


class FittedSource(PosteriorSource):
    """A posterior fitted after training around the run's point estimate. It prunes into a plain net, saved as
    ``pruned-NAME.pt`` (its state_dict, its masks and :meth:`record`) and used as that net: one draw, no
    epistemic part. A subclass implements :meth:`fit`, and may say more in :meth:`summary` and :meth:`record`.
    """

    @property
    def file(self) -> str:
        return f"pruned-{self.name}.pt"

    def summary(self, model) -> str:
        """A few words on the fitted posterior, for the logs (e.g. the prior precisions chosen)."""
        return ""

    def record(self, model) -> dict:
        """What the pruned file keeps about the fit, besides the net and its masks."""
        return {}

    def prune(self, run, reduction, progress: bool = True) -> Pruned:
        from pyrozoo.bmr.rebuild import rebuild

        model, posterior = self.fit(run, progress)
        before = run.net_metrics(rebuild(model, posterior, remove_dead=False))
        report = reduction(model, posterior)
        net = rebuild(model, posterior, remove_dead=False)
        after = run.net_metrics(net)
        path = run.out / self.file
        state = {
            "source": run.source(),
            "posterior": self.name,
            **self.record(model),
            "net_state_dict": net.state_dict(),
            "masks": {layer.name: model.mask(layer.name).bool() for layer in model.layers},
            "report": report.table().to_dict("records"),
            "metrics": after,
        }
        atomic_write(path, lambda p: save_torch(state, p))
        about = self.summary(model)
        line = (
            f"{headline(run, reduction)} from a {self.name} posterior"
            + (f" ({about})" if about else "")
            + f": pruned fraction {report.pruned_fraction:.4f}; the pruned net's state_dict written to {path}"
        )
        return Pruned(report, before, after, line, "before (posterior mean)")

    def load_pruned(self, run) -> tuple[nn.Module, nn.Module]:
        from pyrozoo.bmr.rebuild import rebuild
        from pyrozoo.bmr.units import remove_dead_units
        from pyrozoo.models import BayesianModel

        path = Path(run.out) / self.file
        state = self._read(run, path)
        redo = self._redo(run, path)
        dense = rebuild(
            run.model, run.guide, remove_dead=False
        ).cpu()  # the run's net, its original architecture
        try:
            dense.load_state_dict(state["net_state_dict"])
        except (RuntimeError, KeyError) as e:
            raise PyrozooError(f"{path} does not fit this run ({reason(e)}): {redo}") from None
        output = next(layer.name for layer in run.model.layers if layer.is_output)
        sparse = copy.deepcopy(dense)
        # a model over the pruned net only to carry its masks to the cut (its prior is never drawn)
        model = BayesianModel(sparse, output=output, likelihood=run.model.likelihood)
        for name, mask in state["masks"].items():
            model.set_mask(name, mask)
        remove_dead_units(sparse, model)
        return dense, sparse.eval()

    def _redo(self, run, path: Path) -> str:
        return f"prune again (pyrozoo prune {run.out} --posterior {self.name} ...), or delete {path}"

    def _read(self, run, path: Path) -> dict:
        """The pruned state at ``path``, refused when missing, corrupt or pruned from another checkpoint."""
        redo = self._redo(run, path)
        try:
            state = load_tensors(path, fix=redo)
            if not isinstance(state, dict) or not {"net_state_dict", "masks", "source"} <= set(state):
                raise ValueError(f"not a pyrozoo {self.name}-pruned state")
        except FileNotFoundError:
            raise PyrozooError(
                f"{run.out} has no {path.name}: run pyrozoo prune {run.out} --posterior {self.name} first"
            ) from None
        except PyrozooError:
            raise
        except Exception as e:
            raise PyrozooError(f"{path} is corrupt or truncated ({reason(e)}): {redo}") from None
        made, current = state["source"], run.source()
        if made != current:
            again = (
                ""
                if made.get("checkpoint_sha256") == current["checkpoint_sha256"]
                else " (written again since)"
            )
            raise PyrozooError(
                f"{path} was pruned from the checkpoint of epoch {made.get('epoch')}, step {made.get('step')}, but "
                f"the run's checkpoint is now epoch {current['epoch']}, step {current['step']}{again}: {redo}"
            )
        return state
