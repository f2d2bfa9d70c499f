"""The pruners a compressed net is compared with, each brought to the same cost as pyrozoo's.

Channel pruning is Torch-Pruning's (its dependency graph and ``MetaPruner``), with three of its importance
criteria: L1 magnitude per channel (``tp-l1``), the L2 norm of each coupled group (``tp-group-norm``) and the
first-order Taylor score of each group (``tp-taylor``, gradients of the loss on one training batch). One
pruning ratio for every layer, found by bisection so that the pruned net's cost meets the target. Global
magnitude pruning (``global-magnitude``) zeroes the smallest weights over all layers, those
``torch.nn.utils.prune`` would; it keeps the dense shapes, so its latency is the dense net's.
"""

from __future__ import annotations

import copy
import weakref
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from pyrozoo.bmr.units import release

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
        release(pruner.DG)  # the traced copy's weights, held by the graph's cycles (pyrozoo.bmr.units.release)
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


class _KeepZero:
    """A gradient hook that zeroes the gradient of pruned weights, so that a fine-tune (Adam, SGD, with or
    without weight decay) leaves them at zero, as a ``torch.nn.utils.prune`` mask would."""

    def __init__(self, pruned: torch.Tensor):
        self.pruned = pruned

    def __call__(self, grad: torch.Tensor) -> torch.Tensor:
        if self.pruned.device != grad.device:  # the fine-tune moved the net (to a GPU)
            self.pruned = self.pruned.to(grad.device)
        return grad.masked_fill(self.pruned, 0)


# a globally pruned net -> its weights' gradient hooks, until make_permanent
_KEPT_ZERO: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def global_magnitude(net: nn.Module, keep: list[nn.Module], fraction: float) -> nn.Module:
    """A copy of ``net`` with the smallest ``fraction`` of the weights of its Linear and Conv layers (but
    ``keep``) zeroed, globally by |w|: the weights ``torch.nn.utils.prune.global_unstructured`` with
    ``L1Unstructured`` zeroes (ties at the threshold broken by position). The zeros stay through a fine-tune (their
    gradients are zeroed) until :func:`make_permanent`. Pruned in place, with a one-byte mask per weight: a large
    net is not held three times over (``torch.nn.utils.prune`` keeps the weight, a float mask and the product)."""
    candidate = copy.deepcopy(net)
    kept = {name for name, m in net.named_modules() if m in keep}
    weights = [
        module.weight
        for name, module in candidate.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and name not in kept
    ]
    count = round(fraction * sum(w.numel() for w in weights))  # as torch.nn.utils.prune rounds an amount
    if count == 0:
        return candidate
    threshold = torch.cat([w.abs().flatten() for w in weights]).kthvalue(count).values
    ties = count - sum(int((w.abs() < threshold).sum()) for w in weights)
    hooks = _KEPT_ZERO.setdefault(candidate, [])
    for w in weights:
        pruned = w.abs() < threshold
        if ties > 0:
            first = (w.abs() == threshold).flatten().nonzero().flatten()[:ties]
            pruned.view(-1)[first] = True
            ties -= len(first)
        w.masked_fill_(pruned, 0)
        hooks.append(w.requires_grad_(True).register_hook(_KeepZero(pruned)))  # a copy: frozen or not, it tunes
    return candidate


def make_permanent(net: nn.Module) -> nn.Module:
    """End the pruning of ``net`` (:func:`global_magnitude`'s, or ``torch.nn.utils.prune``'s masks folded into the
    weights): the zeros stay, the hooks go."""
    for hook in _KEPT_ZERO.pop(net, []):
        hook.remove()
    for module in net.modules():
        if torch_prune.is_pruned(module):
            for name in [
                k[: -len("_orig")] for k, _ in module.named_parameters(recurse=False) if k.endswith("_orig")
            ]:
                torch_prune.remove(module, name)
    return net
