"""The pruners a compressed net is compared with, each brought to the same cost as pyrozoo's.

Channel pruning is Torch-Pruning's (its dependency graph and ``MetaPruner``), with three of its importance
criteria: L1 magnitude per channel (``tp-l1``), the L2 norm of each coupled group (``tp-group-norm``) and the
first-order Taylor score of each group (``tp-taylor``, gradients of the loss on one training batch). One
pruning ratio for every layer, found by bisection so that the pruned net's cost meets the target. Global
magnitude pruning (``global-magnitude``) zeroes the smallest weights over all layers, with ``torch.nn.utils.prune``;
it keeps the dense shapes, so its latency is the dense net's.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

PRUNERS = ("tp-l1", "tp-group-norm", "tp-taylor", "global-magnitude")


def _importance(name: str):
    import torch_pruning as tp

    return {
        "tp-l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "tp-group-norm": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "tp-taylor": lambda: tp.importance.GroupTaylorImportance(),
    }[name]()


def channel_prune_to(
    net: nn.Module,
    example: torch.Tensor,
    criterion: str,
    keep: list[nn.Module],
    measure: Callable[[nn.Module], float],
    target: float,
    batch: tuple[torch.Tensor, torch.Tensor] | None = None,
    at_most: bool = True,
    steps: int = 10,
    most: float = 0.99,
) -> tuple[nn.Module, float]:
    """A copy of ``net`` channel-pruned by Torch-Pruning's ``criterion`` (one of :data:`PRUNERS` but
    ``global-magnitude``) to ``measure(pruned) ~ target``, a cost that falls as the ratio grows; returns the
    pruned net and its measure. ``keep`` are modules whose outputs stay (the classifier head). With ``at_most``
    the least-pruned net whose measure is at most ``target`` is returned (the most pruned one tried if none
    is), otherwise the one closest to it. The ratio is bisected ``steps`` times over ``[0, most]``. ``batch``
    (inputs, labels) gives ``tp-taylor`` its gradients.
    """
    import torch_pruning as tp

    def pruned(ratio: float) -> nn.Module:
        candidate = copy.deepcopy(net).eval()
        if ratio <= 0:
            return candidate
        ignored = [candidate.get_submodule(name) for name, m in net.named_modules() if m in keep]
        pruner = tp.pruner.MetaPruner(
            candidate, example, importance=_importance(criterion), pruning_ratio=ratio, ignored_layers=ignored
        )
        if criterion == "tp-taylor":
            x, y = batch
            candidate.zero_grad()
            nn.functional.cross_entropy(candidate(x), y).backward()
        pruner.step()
        candidate.zero_grad(set_to_none=True)
        return candidate

    def better(value: float, than: float) -> bool:
        if not at_most:
            return abs(value - target) < abs(than - target)
        if (value <= target) != (than <= target):
            return value <= target
        return value > than if value <= target else value < than  # least pruned that fits, else most pruned

    lo, hi = 0.0, most
    unpruned = pruned(0.0)  # a copy: the caller may fine-tune what it gets
    best = (unpruned, measure(unpruned))
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        candidate = pruned(mid)
        value = measure(candidate)
        lo, hi = (mid, hi) if value > target else (lo, mid)
        if better(value, best[1]):
            best = (candidate, value)
    return best


def global_magnitude(net: nn.Module, keep: list[nn.Module], fraction: float) -> nn.Module:
    """A copy of ``net`` with the smallest ``fraction`` of the weights of its Linear and Conv layers (but
    ``keep``) zeroed, globally by |w|; the masks stay in force (as ``torch.nn.utils.prune`` hooks) for a
    fine-tune, until :func:`make_permanent`."""
    candidate = copy.deepcopy(net)
    kept = {name for name, m in net.named_modules() if m in keep}
    weights = [
        (module, "weight")
        for name, module in candidate.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and name not in kept
    ]
    if fraction > 0 and weights:
        torch_prune.global_unstructured(weights, pruning_method=torch_prune.L1Unstructured, amount=fraction)
    return candidate


def make_permanent(net: nn.Module) -> nn.Module:
    """Fold ``torch.nn.utils.prune`` masks into the weights (the zeros stay, the hooks go)."""
    for module in net.modules():
        if torch_prune.is_pruned(module):
            for name in [
                k[: -len("_orig")] for k, _ in module.named_parameters(recurse=False) if k.endswith("_orig")
            ]:
                torch_prune.remove(module, name)
    return net
