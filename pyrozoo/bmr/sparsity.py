"""Pruning to a target sparsity: rank entries by evidence (dF) and remove the least needed.

BMR's own rules say *how many* weights to remove; a practitioner often has a budget instead ("keep 10%"). This
decision meets the budget while keeping BMR's reason for every removal: it removes the entries whose removal
raises the evidence most (largest dF), until ``sparsity`` of the prunable entries are pruned, ranked over all
prunable layers at once or, with ``per_layer``, in each layer alike. Entries already pruned count towards the
target, and no entry comes back, so a model already sparser than the target is left as it is.

A budget never kills the net. Ranked globally, one layer's entries can all score above the others' (a Laplace
posterior's curvature differs by orders of magnitude between layers), and the budget would empty that layer:
every unit before it loses its consumers, every unit after it its inputs, and the net is a constant that
"meets" any sparsity. Unless ``allow_empty`` (every reduction's option), the ranking skips an entry whose
removal would leave a layer that still has live weights with none, counting the entries that then die with their
units (dead or unused units, :class:`~pyrozoo.bmr.livepath.Effect`); in a chain of layers that keeps a path from the
input to every output layer. Where the skipped entries make the budget unreachable the decision stops short, says so in
the report's ``note`` column, and the report's pruned fraction is the one reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from pyrozoo.bmr.livepath import ALLOW_EMPTY, Effect
from pyrozoo.bmr.reduction import REDUCTIONS, Decision, WeightReduction
from pyrozoo.errors import PyrozooError


@REDUCTIONS.register("sparsity")
@dataclass(frozen=True)
class TargetSparsity(WeightReduction):
    """Prune the entries of largest dF until ``sparsity`` of the prunable entries are pruned (globally, or
    ``per_layer``), never emptying a layer unless ``allow_empty`` (see the module docstring)."""

    sparsity: float = 0.9
    per_layer: bool = False
    name: ClassVar[str] = "sparsity"
    guards_live_path: ClassVar[bool] = True  # decide_model's own ranking skips every entry that would cut

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

    def decide_model(self, model, scores: dict, live: dict) -> dict[str, Decision]:
        if self.allow_empty:
            return self.decide_layers(scores, live)
        return self._decide_keeping_a_path(model, scores, live)

    def _decide_keeping_a_path(self, model, scores: dict, live: dict) -> dict[str, Decision]:
        """Prune in order of dF until the *effective* pruned count (entries of dead and unused units included)
        reaches the target, skipping each entry whose removal (after those before it) would cut a layer or
        overshoot the target.

        What a prefix of the ranking cuts, and how many entries it prunes, only grow with the prefix, so the
        first entry that fails is found by bisection over the prefix length; it is set aside and the ranking
        resumes without it. Overshooting entries are set aside until the count is within one entry per layer of
        the target, at most :data:`SKIPS` times per ranking. Per layer, the rankings run one layer after another
        and none may push a layer already done over its target (its units can die with a later layer's)."""
        effect = Effect(model, live)
        names = list(scores)
        sizes = [live[n].numel() for n in names]
        offsets = dict(zip(names, torch.tensor([0, *sizes]).cumsum(0).tolist()))
        full = getattr(model, "full_shapes", {})  # a compacted model: the entries compaction removed count
        removed = {n: full.get(n, live[n].shape).numel() - live[n].numel() for n in names}
        flat_scores = torch.cat([scores[n].flatten() for n in names])
        keep = torch.cat([live[n].flatten() for n in names])
        protected = torch.zeros_like(keep)  # set aside: their removal would cut a layer
        skipped = torch.zeros_like(keep)  # set aside: their removal would overshoot the target
        targets = []  # (layers, target) of the rankings done and the current one's: none may overshoot
        cutoff, short = math.inf, []

        def trial(prefix: torch.Tensor) -> tuple[bool, bool, int]:
            """Pruning ``prefix`` too: whether it cuts a layer, whether it overshoots a target, and the current
            ranking's effectively pruned count."""
            candidate = keep.clone()
            candidate[prefix] = False
            cut, pruned = effect({n: p.reshape(live[n].shape) for n, p in zip(names, candidate.split(sizes))})
            counts = [sum(pruned[n] + removed[n] for n in group) for group, _ in targets]
            over = any(count > target for count, (_, target) in zip(counts, targets))
            return bool(cut), over, counts[-1]

        for group in [[n] for n in names] if self.per_layer else [names]:
            target = round(self.sparsity * sum(live[n].numel() + removed[n] for n in group))
            targets.append((group, target))
            index = torch.cat([torch.arange(offsets[n], offsets[n] + live[n].numel()) for n in group])
            index = index[keep[index]]
            order = index[flat_scores[index].argsort(descending=True, stable=True)]
            length, pruned, skips = _longest_safe_prefix(order, target, len(group), trial, protected, skipped)
            chosen = order[~(protected | skipped)[order]][:length]
            keep[chosen] = False
            if len(chosen):
                cutoff = min(cutoff, float(flat_scores[chosen].min()))
            if pruned < target - len(group):
                why = (
                    "further entries would take whole units with them past the target"
                    if skips
                    else f"the rest would disconnect the net; {ALLOW_EMPTY}"
                )
                short.append((group, target - pruned, why))
        return self._noted_decisions(names, live, keep, protected, cutoff, short)

    def _noted_decisions(self, names, live, keep, protected, cutoff, short) -> dict[str, Decision]:
        """Each layer's decision from the flat ``keep``, noting the entries kept to keep a path and the targets
        that ``short`` (layers, entries missing, why) says were not met."""
        sizes = [live[n].numel() for n in names]
        inclusion = keep.float().mean().item()
        decisions = {}
        for n, part, kept in zip(names, keep.split(sizes), protected.split(sizes)):
            notes = [f"kept {int(kept.sum())} entries whose removal would leave a layer with no live weight"]
            notes = notes if bool(kept.any()) else []
            notes += [
                f"target sparsity {self.sparsity:g} not met: {missing} entries short ({why})"
                for group, missing, why in short
                if n in group
            ]
            decisions[n] = Decision(part.reshape(live[n].shape), inclusion, cutoff, "; ".join(notes))
        return decisions

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


SKIPS = 32  # entries set aside for overshooting the target, at most, per ranking


def _longest_safe_prefix(order, target: int, slack: int, trial, protected, skipped) -> tuple[int, int, int]:
    """The longest prefix of the ranking ``order`` (less the entries set aside) that ``trial`` says neither cuts
    a layer nor overshoots, found by bisection; each entry that fails is set aside in place, in ``protected``
    (it cuts) or ``skipped`` (it overshoots). Stops within ``slack`` entries of ``target``. Returns the prefix
    length, the pruned count it reaches and how many entries were skipped."""

    def passes(prefix: torch.Tensor) -> bool:
        cut, over, _ = trial(prefix)
        return not (cut or over)

    pruned = trial(order[:0])[2]
    low = done = skips = 0  # a prefix of ``done`` candidates passes
    while pruned < target:
        candidates = order[~(protected | skipped)[order]]
        # at most what the target still lacks: an entry prunes itself or, already dead with its unit, nothing
        high = min(len(candidates), done + target - pruned)
        if passes(candidates[:high]):
            low = done = high
            pruned = trial(candidates[:low])[2]
            if low == len(candidates) or pruned >= target - slack:
                break
            continue  # the target lies further down the ranking
        low = done  # a prefix of ``low`` passes, one of ``high`` fails
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if passes(candidates[:middle]) else (low, middle)
        pruned = trial(candidates[:low])[2]
        if pruned >= target - slack:
            break
        cut = trial(candidates[: low + 1])[0]
        if not cut:
            skips += 1
            if skips > SKIPS:
                break
        (protected if cut else skipped)[candidates[low]] = True
        done = low
    return low, pruned, skips
