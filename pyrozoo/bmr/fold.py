"""Constants that silent units leave behind, folded into the layers that consume them (issue 28).

A unit whose producing weights are all pruned does not always output 0: a BatchNorm after it adds its shift
(``bias - weight * running_mean / std``), an activation maps 0 to ``act(0)`` (sigmoid: 0.5). That constant still
reaches the next layers, so the unit can go only when its contribution is moved into them. This is exact where
the consumer sees the same value at every input position it reads:

- a Linear layer: ``bias += W[:, columns] @ constant``;
- a convolution without zero padding (1x1, unpadded, or padded by replication, reflection or wrapping):
  ``bias += W[:, channels].sum(kernel) @ constant``. A zero-padded one reads zeros at its borders, where the
  constant is not, so the unit stays (unless its constant is 0);
- a consumer without a bias that feeds a BatchNorm directly moves it into that BatchNorm's running mean
  instead; any other gets a bias.

The constants are read off the net itself, on the example batch (the consumer's input must be the same
number at every position and in every sample), so a fold is never a guess; the caller checks the outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from pyrozoo.models.bayesian import call_arguments, select_output
from pyrozoo.models.layers import is_batch_norm

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Fold:
    """For one group: which units' constants can be folded, and, per consumer module, each unit's
    contribution to that module's output ``(count, out)``; ``why`` says why the others cannot."""

    foldable: torch.Tensor
    contributions: dict[str, torch.Tensor]
    why: str = ""


def _zero_padded(conv: nn.Module) -> bool:
    if conv.padding_mode != "zeros":
        return False
    if isinstance(conv.padding, str):
        return conv.padding != "valid"
    return any(p != 0 for p in conv.padding)


def _constant(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``values`` (positions, columns): whether it holds one value, and that value."""
    first = values[0]
    spread = (values - first).abs().amax(0)
    return spread <= 1e-6 * first.abs().clamp(min=1.0), first


def _member_fold(module: nn.Module, member, x: torch.Tensor, path: str):
    """Per unit, whether its input to the consumer ``module`` (``x`` on the example batch) is a constant that
    folds, and that constant's contribution to the module's outputs ``(count, out)``; or ``(None, why)``."""
    index = member.index.to(x.device)
    weight = module.weight.detach()
    if isinstance(module, nn.Linear):
        values = x.reshape(-1, x.shape[-1])[:, index.flatten()]  # (positions, units * k)
        same, constant = _constant(values)
        same, constant = same.view(index.shape), constant.view(index.shape)
        contribution = (weight[:, index] * constant).sum(-1).T  # (units, out)
        return same.all(1), contribution
    if isinstance(module, _CONVS) and module.groups == 1:
        kernel = math.prod(weight.shape[2:])
        channels = index[:, ::kernel] // kernel  # (units, channels per unit)
        values = x.transpose(0, 1)[channels.flatten()].flatten(1).T  # (positions, units * channels)
        same, constant = _constant(values)
        same, constant = same.view(channels.shape), constant.view(channels.shape)
        if _zero_padded(module):  # its borders read zeros: only a zero constant is the same there
            same &= constant == 0
        summed = weight.flatten(2).sum(-1)  # (out, in)
        contribution = (summed[:, channels] * constant).sum(-1).T
        return same.all(1), contribution
    return (
        None,
        f"their constant output reaches {path!r} ({type(module).__name__}), which it cannot be folded into",
    )


@torch.no_grad()
def plan_folds(net: nn.Module, example, output_key, groups: list) -> dict[str, Fold]:
    """For each ``(units, silent)`` of ``groups`` (``silent``: boolean per unit, producers all pruned), which
    silent units' constants can be folded into their consumers in ``net`` (in eval mode), and how."""
    paths = {member.layer for units, _ in groups for member in units.consumers}
    named = dict(net.named_modules())
    modules = {path: named[path] for path in paths if path in named}
    inputs, hooks = {}, []
    for path, module in modules.items():
        hooks.append(
            module.register_forward_pre_hook(
                lambda m, args, path=path: inputs.__setitem__(path, args[0] if args else None)
            )
        )
    _run(net, example, output_key, hooks)
    plans = {}
    for units, silent in groups:
        foldable = silent.clone()
        contributions, why = {}, ""
        for member in units.consumers:
            module, x = modules.get(member.layer), inputs.get(member.layer)
            if module is None or x is None or not isinstance(x, torch.Tensor):
                found, detail = (
                    None,
                    f"their constant output reaches {member.layer!r}, which it cannot be folded into",
                )
            else:
                found, detail = _member_fold(module, member, x, member.layer)
            if found is None:
                foldable[:], why = False, detail
                break
            found = found.to(foldable.device)
            if bool((silent & ~found).any()) and not why:
                why = f"their constant output reaches {member.layer!r}, " + (
                    "a zero-padded convolution, where it cannot be folded"
                    if isinstance(module, _CONVS) and _zero_padded(module)
                    else "and is not the same at every position of the example batch"
                )
            foldable &= found
            contributions[member.layer] = contributions.get(member.layer, 0) + detail
        plans[units.name] = Fold(foldable, contributions, why)
    return plans


def _run(net: nn.Module, example, output_key, hooks: list) -> None:
    """One forward pass of ``net`` on ``example`` for its ``hooks`` to watch; they are removed after."""
    args, kwargs = call_arguments(example)
    try:
        select_output(net(*args, **kwargs), output_key)
    finally:
        for hook in hooks:
            hook.remove()


@torch.no_grad()
def apply_folds(net: nn.Module, example, output_key, shifts: dict[str, torch.Tensor]) -> None:
    """Add ``shifts`` (per consumer path, a vector over its outputs) to the consumers' outputs in ``net``: to a
    bias, to the running mean (subtracted) of a BatchNorm that the consumer alone feeds, or to a new bias."""
    shifts = {path: d for path, d in shifts.items() if bool(d.any())}
    if not shifts:
        return
    feeds = _batch_norms_fed(net, example, output_key, set(shifts))
    for path, shift in shifts.items():
        module = net.get_submodule(path)
        if module.bias is not None:
            module.bias.add_(shift.to(module.bias))
        elif path in feeds:
            feeds[path].running_mean.sub_(shift.to(feeds[path].running_mean))
        else:
            module.bias = nn.Parameter(shift.to(module.weight).clone())


def _batch_norms_fed(net, example, output_key, paths: set[str]) -> dict[str, nn.Module]:
    """The BatchNorm (in eval mode, with running statistics) that each consumer in ``paths`` feeds directly, for
    consumers whose output goes to exactly one module and that module is it."""
    outputs, readers, hooks = {}, {}, []
    for path in paths:
        module = net.get_submodule(path)
        hooks.append(
            module.register_forward_hook(
                lambda m, a, out, path=path: outputs.__setitem__(id(out), (path, out))
            )
        )
    for module in net.modules():
        if hooks and not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):

            def read(m, args):
                for a in args:
                    if isinstance(a, torch.Tensor) and id(a) in outputs:
                        readers.setdefault(outputs[id(a)][0], []).append(m)

            hooks.append(module.register_forward_pre_hook(read))
    _run(net, example, output_key, hooks)
    return {
        path: found[0]
        for path, found in readers.items()
        if len(found) == 1
        and is_batch_norm(found[0])
        and not found[0].training
        and found[0].running_mean is not None
    }
