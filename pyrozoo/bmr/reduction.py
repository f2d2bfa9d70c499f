"""A reduction is one object: ``reduction(model, posterior) -> PruneReport``, its options typed dataclass fields.

Three parts stay separate, as in JAXPruner (``calculate_scores``) and ``torch.nn.utils.prune``
(``compute_mask``):

- the **score** of each entry (BMR's dF by default, :mod:`pyrozoo.bmr.scores`): a :class:`WeightReduction`
  overrides :meth:`~WeightReduction.scores` to use another (the horseshoe's shrinkage, say);
- the **decision** from scores to a keep-mask (:meth:`~WeightReduction.decide`: threshold, spike-and-slab, a
  target sparsity), which only ever loses entries;
- the **scope**: single weights (:class:`WeightReduction`), or whole units whose entries are scored together
  (:class:`~pyrozoo.bmr.unit_reduction.UnitReduction`, over the coupled groups of
  :mod:`pyrozoo.bmr.units`).

Reductions compose: ``Threshold().then(UnitReduction())`` is one reduction, a per-weight pass and then a structured one.
Every registered reduction is in :data:`REDUCTIONS`; :func:`make_reduction` builds one from a name and options,
checked against its fields. To add one, write a dataclass subclass in a file of its own and register it (see
``pyrozoo/bmr/sparsity.py`` and CONTRIBUTING.md).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import ClassVar, NamedTuple

import pandas as pd
import torch

from pyrozoo.bmr.livepath import keep_live_path, spared_note
from pyrozoo.bmr.units import pruned_fraction
from pyrozoo.options import bind_options, build_with_options
from pyrozoo.registry import Registry, option_defaults

REDUCTIONS = Registry("reduction")


class Decision(NamedTuple):
    keep: torch.Tensor  # boolean, shaped like the scores
    inclusion: float  # the decision's estimate of the fraction of entries worth keeping
    cutoff: float  # entries scoring above it are pruned
    note: str = ""  # why the decision kept more than it was asked to (a guard), for the layer's report


@dataclass
class LayerReport:
    layer: str
    size: int  # entries of the layer's latent (weights and bias)
    live_before: int
    kept: int
    inclusion: float  # the decision's estimate of the fraction worth keeping
    cutoff: float  # score (dF for BMR) above which entries were pruned
    score_min: float  # over the live entries
    score_median: float
    score_max: float
    note: str = ""  # e.g. a guard that stopped the reduction
    score_positive: float = float("nan")  # fraction of all entries, pruned ones too, scoring above 0 (dF > 0)


@dataclass
class PruneReport:
    layers: list[LayerReport]
    seconds: float
    pruned_fraction: float

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(r) for r in self.layers])

    def then(self, later: "PruneReport") -> "PruneReport":
        """This report followed by a later pass's: every layer row, the summed time, the final fraction."""
        return PruneReport(self.layers + later.layers, self.seconds + later.seconds, later.pruned_fraction)


def score_summary(scores: torch.Tensor, live: torch.Tensor) -> tuple[float, float, float]:
    """Smallest, median and largest score over the live entries (zeros when none is live)."""
    values = scores[live] if bool(live.any()) else torch.zeros(1)
    return float(values.min()), float(values.median()), float(values.max())


@dataclass(frozen=True)
class Reduction:
    """Maps ``(model, posterior)`` to a :class:`PruneReport`, writing new keep-masks into the model and the
    reduced posterior into the posterior source. Masks only ever lose entries.

    Every reduction takes the option ``allow_empty`` (declared here, once): off, it never leaves a layer between
    the input and the output without a live weight (:mod:`pyrozoo.bmr.livepath`); on, the rule's decision stands
    even where it cuts the net."""

    allow_empty: bool = field(default=False, kw_only=True)
    name: ClassVar[str] = ""

    def __call__(self, model, posterior) -> PruneReport:
        raise NotImplementedError

    @property
    def resets_pruned(self) -> bool:
        """Whether entries it prunes get the prior as posterior (their exact posterior, as the weight no longer
        touches the likelihood); a reduction that follows the reference code keeps their variational parameters
        instead."""
        return True

    def then(self, later: "Reduction") -> "Sequence":
        """This reduction followed by ``later``, as one reduction."""
        return Sequence((self, later))

    def options(self) -> dict:
        """The option values of this reduction (its dataclass fields, in the order its options are listed)."""
        return {name: getattr(self, name) for name in option_defaults(type(self))}

    def describe(self) -> str:
        """Its name and its options, e.g. ``spike-and-slab(count_pruned=True, max_cutoff=0.0, iterations=4)``;
        ``allow_empty`` only when set."""
        shown = {k: v for k, v in self.options().items() if k != "allow_empty" or v}
        options = ", ".join(f"{k}={v!r}" for k, v in shown.items())
        return f"{self.name}({options})"

    @property
    def allows_empty(self) -> bool:
        """Whether a user asked this reduction (or a step of it) to be free to empty a layer."""
        return self.allow_empty


@dataclass(frozen=True)
class Sequence(Reduction):
    """Reductions applied one after another, each on the masks the previous one left."""

    steps: tuple[Reduction, ...]
    name: ClassVar[str] = "sequence"

    def __call__(self, model, posterior) -> PruneReport:
        report = None
        for step in self.steps:
            later = step(model, posterior)
            report = later if report is None else report.then(later)
        return report

    def then(self, later: Reduction) -> "Sequence":
        return Sequence((*self.steps, later))

    def describe(self) -> str:
        return " then ".join(step.describe() for step in self.steps)

    @property
    def allows_empty(self) -> bool:
        return any(step.allows_empty for step in self.steps)


class WeightReduction(Reduction):
    """A reduction of single entries: score every entry of every prunable layer, decide per layer which to keep.

    Subclasses implement :meth:`decide` (one layer), or :meth:`decide_layers` (all layers at once, for decisions
    that rank across layers), or :meth:`decide_model` (for decisions that also look at how the layers connect),
    and may override :meth:`scores`. Unless ``allow_empty``, the decisions then go through the live-path guard
    (:func:`~pyrozoo.bmr.livepath.keep_live_path`). Pruned entries of the posterior are reset to
    their prior, their exact posterior once the weight no longer touches the likelihood; under a mean-field
    posterior the surviving entries' reduced posterior equals their full one, so nothing else changes.
    """

    # True where decide_model keeps a live path itself, so the shared guard need not check it again
    guards_live_path: ClassVar[bool] = False

    def scores(self, model, posterior) -> dict[str, torch.Tensor]:
        """``{layer: score per entry}``, high meaning prune; BMR's dF by default."""
        from pyrozoo.bmr.scores import delta_f

        return delta_f(model, posterior)

    def decide(self, scores: torch.Tensor, live: torch.Tensor) -> Decision:
        raise NotImplementedError

    def decide_layers(self, scores: dict, live: dict) -> dict[str, Decision]:
        return {name: self.decide(scores[name], live[name]) for name in scores}

    def decide_model(self, model, scores: dict, live: dict) -> dict[str, Decision]:
        """The decisions for ``model``'s layers; :meth:`decide_layers` unless a decision needs the model."""
        return self.decide_layers(scores, live)

    @torch.no_grad()
    def __call__(self, model, posterior, scores: dict[str, torch.Tensor] | None = None) -> PruneReport:
        start = time.perf_counter()
        scores = self.scores(model, posterior) if scores is None else scores
        layers = [layer for layer in model.layers if layer.name in scores]
        live = {layer.name: model.mask(layer.name).bool() for layer in layers}
        decisions = self.decide_model(model, scores, live)
        # pruned entries stay pruned whatever a decision says
        keeps = {name: decisions[name].keep & was_live for name, was_live in live.items()}
        guarded = self.allow_empty or self.guards_live_path
        spared = {} if guarded else keep_live_path(model, live, keeps, scores)
        reports = []
        for layer in layers:
            decision, was_live, keep = decisions[layer.name], live[layer.name], keeps[layer.name]
            notes = [decision.note] + ([spared_note(spared[layer.name])] if layer.name in spared else [])
            note = "; ".join(filter(None, notes))
            model.set_mask(layer.name, keep)
            if self.resets_pruned:  # and a correlated posterior's survivors move to the reduced mean
                posterior.reduce(layer.site, ~keep)
            reports.append(
                LayerReport(
                    layer.name,
                    getattr(model, "full_shapes", {}).get(layer.name, was_live.shape).numel(),  # original net
                    int(was_live.sum()),
                    int(keep.sum()),
                    decision.inclusion,
                    decision.cutoff,
                    *score_summary(scores[layer.name], was_live),
                    note=note,
                    score_positive=float((scores[layer.name] > 0).double().mean()),
                )
            )
        return PruneReport(reports, time.perf_counter() - start, pruned_fraction(model))


def make_reduction(name: str, **options) -> Reduction:
    """The registered reduction ``name`` with ``options``; an option it does not take is an error naming those
    it does."""
    return build_with_options(f"reduction {name!r}", REDUCTIONS[name], options)


def configure(reduction: Reduction, options: dict) -> Reduction:
    """``reduction`` with some of its options replaced (checked as :func:`make_reduction` checks them)."""
    if not options:
        return reduction
    return dataclasses.replace(
        reduction, **bind_options(f"reduction {reduction.name!r}", type(reduction), options)
    )
