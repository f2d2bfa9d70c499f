"""Pruning to a target sparsity: rank entries by evidence (dF) and remove the least needed.

BMR's own rules say *how many* weights to remove; a practitioner often has a budget instead ("keep 10%"). This
decision meets the budget while keeping BMR's reason for every removal: it removes the entries whose removal
raises the evidence most (largest dF), until ``sparsity`` of the prunable entries are pruned, ranked over all
prunable layers at once or, with ``per_layer``, in each layer alike. Entries already pruned count towards the
target, and no entry comes back, so a model already sparser than the target is left as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from pyrozoo.bmr.reduction import REDUCTIONS, Decision, WeightReduction
from pyrozoo.errors import PyrozooError


@REDUCTIONS.register("sparsity")
@dataclass(frozen=True)
class TargetSparsity(WeightReduction):
    """Prune the entries of largest dF until ``sparsity`` of the prunable entries are pruned (globally, or
    ``per_layer``)."""

    sparsity: float = 0.9
    per_layer: bool = False
    name: ClassVar[str] = "sparsity"

    def __post_init__(self):
        if not 0 <= self.sparsity <= 1:
            raise PyrozooError(f"sparsity: the target lies in [0, 1], got {self.sparsity}")

    def decide(self, scores: torch.Tensor, live: torch.Tensor) -> Decision:
        keep, cutoff = self._rank(scores.flatten(), live.flatten())
        return Decision(keep.reshape(live.shape), keep.float().mean().item(), cutoff)

    def decide_layers(self, scores: dict, live: dict) -> dict[str, Decision]:
        if self.per_layer:
            return super().decide_layers(scores, live)
        names = list(scores)
        keep, cutoff = self._rank(
            torch.cat([scores[n].flatten() for n in names]), torch.cat([live[n].flatten() for n in names])
        )
        parts = keep.split([live[n].numel() for n in names])
        inclusion = keep.float().mean().item()
        return {n: Decision(part.reshape(live[n].shape), inclusion, cutoff) for n, part in zip(names, parts)}

    def _rank(self, scores: torch.Tensor, live: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Keep-mask over flat entries, and the smallest dF pruned now (inf when nothing more is pruned)."""
        more = round(self.sparsity * live.numel()) - int((~live).sum())
        keep = live.clone()
        if more <= 0:
            return keep, math.inf
        ranked = torch.where(live, scores, torch.full_like(scores, -math.inf))
        worst = ranked.topk(more).indices
        keep[worst] = False
        return keep, float(ranked[worst].min())
