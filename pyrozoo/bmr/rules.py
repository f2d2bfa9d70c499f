"""Per-weight decisions on BMR's evidence gains (docs/method.md#reductions): from a layer's dF to a keep-mask.

dF > 0 means removing the weight raises the evidence. Each decision is a registered
:class:`~pyrozoo.bmr.reduction.WeightReduction` whose options are its fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from pyrozoo.bmr.reduction import REDUCTIONS, Decision, WeightReduction
from pyrozoo.errors import PyrozooError


@REDUCTIONS.register("threshold")
@dataclass(frozen=True)
class Threshold(WeightReduction):
    """Prune a weight iff its dF exceeds ``margin`` (0: iff removing it raises the evidence)."""

    margin: float = 0.0
    name: ClassVar[str] = "threshold"

    def __post_init__(self):
        if self.margin != self.margin:  # NaN: every comparison is False, so everything would be pruned
            raise PyrozooError("threshold: the margin must be a number, got nan")

    def decide(self, scores: torch.Tensor, live: torch.Tensor) -> Decision:
        keep = live & (scores <= self.margin)
        return Decision(keep, keep.sum().item() / max(live.sum().item(), 1), self.margin)


@REDUCTIONS.register("spike-and-slab")
@dataclass(frozen=True)
class SpikeAndSlab(WeightReduction):
    """Spike-and-slab rule: a Beta(1, 1) prior on the layer's inclusion probability, updated by mean field.

    ``zeta = E[ln p] - E[ln(1 - p)]`` starts at 0; each iteration sets ``q_k = sigmoid(zeta - dF_k)``,
    ``a = 1 + sum q``, ``b = 1 + sum (1 - q)``, ``zeta = digamma(a) - digamma(b)``. Weight k is kept iff
    ``dF_k <= zeta``. When most weights look prunable the cut-off falls below 0 and pruning gets bolder.

    Which entries vote, and what becomes of pruned ones, is where variants differ:

    - ``pruned_vote=True`` (the default, as the reference code runs it): the sums run over every entry of the
      layer, pruned ones too, each with its own current dF; and with ``keep_pruned_posterior=True`` (the
      default) a pruned entry keeps its variational parameters, which then drift under the KL alone towards the
      prior (so its dF drifts towards 0 and its vote towards inclusion). Together these give the reference's
      trajectory: pruning starts late, then accelerates (experiments/RESULTS.md, bmr-ss as the reference code
      runs it).
    - ``pruned_vote=False, keep_pruned_posterior=False``: the sums run over the live weights only and pruned
      entries are reset to the prior, their exact posterior (pyrozoo's rule before 2026-11-30).
    - ``count_pruned=True`` (whatever ``pruned_vote`` says): pruned entries vote as excluded (``q = 0``), so
      the inclusion estimate is the layer's, not the survivors'; ``max_cutoff`` caps the cut-off (with 0 no
      weight whose removal raises the evidence is ever kept). ``bmr-lss`` is this with the cap at 0.
    """

    count_pruned: bool = False
    max_cutoff: float | None = None
    iterations: int = 4
    pruned_vote: bool = True
    keep_pruned_posterior: bool = True
    name: ClassVar[str] = "spike-and-slab"

    def __post_init__(self):
        if self.iterations < 0:
            raise PyrozooError(f"spike-and-slab: iterations must not be negative, got {self.iterations}")

    @property
    def resets_pruned(self) -> bool:
        return not self.keep_pruned_posterior

    def decide(self, scores: torch.Tensor, live: torch.Tensor) -> Decision:
        # Masked sums over the whole tensor (no boolean-indexed copy); float64 accumulators, as the sums run
        # over up to millions of weights.
        zeta = torch.zeros((), dtype=torch.float64, device=scores.device)
        a = b = torch.ones((), dtype=torch.float64)
        voters = torch.ones_like(live) if self.pruned_vote and not self.count_pruned else live
        live_count = voters.sum(dtype=torch.float64)
        excluded = (~live).sum(dtype=torch.float64) if self.count_pruned else 0.0
        for _ in range(self.iterations):
            q = torch.sigmoid(zeta.to(scores.dtype) - scores).masked_fill_(~voters, 0.0)
            included = q.sum(dtype=torch.float64)
            a, b = 1 + included, 1 + live_count - included + excluded
            zeta = torch.digamma(a) - torch.digamma(b)
        cutoff = zeta.item()
        if self.max_cutoff is not None:
            cutoff = min(cutoff, self.max_cutoff)
        return Decision(live & (scores <= cutoff), (a / (a + b)).item(), cutoff)


@REDUCTIONS.register("shrinkage")
@dataclass(frozen=True)
class Shrinkage(WeightReduction):
    """A hierarchical prior's own verdict: prune the rows whose posterior-mean prior scale (for the horseshoe,
    its shrinkage ``E[gamma_r]``) is below ``threshold``. Scores are ``-scale``, not dF."""

    threshold: float = 0.005
    samples: int = 100  # posterior draws averaged for the scales
    name: ClassVar[str] = "shrinkage"

    def __post_init__(self):
        if not self.threshold > 0:
            raise PyrozooError(
                f"shrinkage: the threshold is a scale and must be positive, got {self.threshold}"
            )
        if self.samples < 1:
            raise PyrozooError(f"shrinkage: samples must be at least 1, got {self.samples}")

    def scores(self, model, posterior) -> dict[str, torch.Tensor]:
        from pyrozoo.bmr.scores import posterior_scales, shrinkage_scores

        return shrinkage_scores(model, posterior_scales(model, posterior, self.samples))

    def decide(self, scores: torch.Tensor, live: torch.Tensor) -> Decision:
        return Threshold(margin=-self.threshold).decide(scores, live)
