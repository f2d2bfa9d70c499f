"""Pruning rules: from the evidence gains dF of a layer's live weights to a keep-mask (PAPER.md §4).

A rule is a function ``rule(delta_f, live) -> Decision`` where ``delta_f`` holds dF of every weight of one layer
(dF > 0: removing the weight raises the evidence) and ``live`` marks the weights not pruned yet. Pruned weights
stay pruned: the returned mask never keeps a weight that was not live.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pyrozoo.errors import PyrozooError


class Decision(NamedTuple):
    keep: torch.Tensor  # boolean, shaped like delta_f
    inclusion: float  # the rule's estimate of the fraction of weights worth keeping
    cutoff: float  # weights with dF above it are pruned


def threshold(delta_f: torch.Tensor, live: torch.Tensor, margin: float = 0.0) -> Decision:
    """Prune a weight iff its dF exceeds ``margin`` (0: iff removing it raises the evidence)."""
    keep = live & (delta_f <= margin)
    return Decision(keep, keep.sum().item() / max(live.sum().item(), 1), margin)


def spike_and_slab(
    delta_f: torch.Tensor,
    live: torch.Tensor,
    iterations: int = 4,
    count_pruned: bool = False,
    max_cutoff: float | None = None,
) -> Decision:
    """Spike-and-slab rule: a Beta(1, 1) prior on the layer's inclusion probability, updated by mean field.

    ``zeta = E[ln p] - E[ln(1 - p)]`` starts at 0; each iteration sets ``q_k = sigmoid(zeta - dF_k)``,
    ``a = 1 + sum q``, ``b = 1 + sum (1 - q)``, ``zeta = digamma(a) - digamma(b)``. Weight k is kept iff
    ``dF_k <= zeta``. When most weights look prunable the cutoff falls below 0 and pruning gets bolder.
    The sums run over the live weights (PAPER.md §4); ``count_pruned=True`` also counts the already pruned
    weights as excluded (``q = 0``), so the inclusion estimate is the layer's, not the survivors'.
    ``max_cutoff`` caps the cut-off: with 0 no weight whose removal raises the evidence is ever kept.
    """
    # Masked sums over the whole tensor (no boolean-indexed copy); float64 accumulators, as the sums run over
    # up to millions of weights.
    zeta = torch.zeros((), dtype=torch.float64, device=delta_f.device)
    live_count = live.sum(dtype=torch.float64)
    excluded = (~live).sum(dtype=torch.float64) if count_pruned else 0.0
    for _ in range(iterations):
        q = torch.sigmoid(zeta.to(delta_f.dtype) - delta_f).masked_fill_(~live, 0.0)
        included = q.sum(dtype=torch.float64)
        a, b = 1 + included, 1 + live_count - included + excluded
        zeta = torch.digamma(a) - torch.digamma(b)
    if iterations == 0:
        a = b = torch.ones((), dtype=torch.float64)
    cutoff = zeta.item()
    if max_cutoff is not None:
        cutoff = min(cutoff, max_cutoff)
    keep = live & (delta_f <= cutoff)
    return Decision(keep, (a / (a + b)).item(), cutoff)


def layer_spike_and_slab(delta_f: torch.Tensor, live: torch.Tensor, iterations: int = 4) -> Decision:
    """Spike-and-slab with the inclusion estimated over the whole layer (pruned weights count as excluded) and
    the cut-off capped at 0: a weight goes if removing it raises the evidence (the threshold rule) or if the
    layer's inclusion odds, mostly pruned already, say it is more likely out than in.

    Why the cap: early in training the posteriors still sit near their initialisation (scale 0.1, so precision
    100), every weight looks needed, the inclusion estimate is high, and the uncapped spike-and-slab cut-off
    is positive, so it would keep weights whose own dF says remove them.
    """
    return spike_and_slab(delta_f, live, iterations, count_pruned=True, max_cutoff=0.0)


RULES = {
    "threshold": threshold,
    "spike-and-slab": spike_and_slab,
    "layer-spike-and-slab": layer_spike_and_slab,
}


def get_rule(name: str):
    try:
        return RULES[name]
    except KeyError:
        raise PyrozooError(f"unknown BMR rule {name!r}; known rules: {', '.join(RULES)}") from None
