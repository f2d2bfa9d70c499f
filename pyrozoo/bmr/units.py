"""Units (neurons, channels) of chain-shaped nets: which are dead after pruning, and how to cut them out.

A net declares ``chain = True`` when each weight layer feeds the next directly through activations and pooling
that map 0 to 0 (MLP, LeNet). Then a unit whose every input weight and bias is pruned outputs exactly 0, and
its outgoing weights are as good as pruned; a unit whose every outgoing weight is pruned is unused. Input column
``j`` of the next layer's latent belongs to unit ``j // group``, where ``group`` is the kernel area (conv after
conv) or the flattened spatial size (linear after conv).
"""

from __future__ import annotations

import torch
from torch import nn

from pyrozoo.models.layers import Layer


def is_chain(net: nn.Module) -> bool:
    return bool(getattr(net, "chain", False))


def _grouped_inputs(mask: torch.Tensor, consumer: Layer, units: int) -> torch.Tensor:
    """A consumer's ``(out, fan_in [+1])`` matrix without its bias column, viewed as ``(out, units, group)``."""
    return mask[:, : consumer.fan_in].reshape(mask.shape[0], units, consumer.fan_in // units)


def effective_masks(model) -> dict[str, torch.Tensor]:
    """Boolean keep-masks with the outgoing weights of dead units (all inputs pruned) marked pruned too."""
    masks = {layer.name: model.mask(layer.name).bool().clone() for layer in model.layers}
    if is_chain(model.net):
        for producer, consumer in zip(model.layers, model.layers[1:]):
            dead = ~masks[producer.name].any(dim=1)
            _grouped_inputs(masks[consumer.name], consumer, producer.shape[0])[:, dead, :] = False
    return masks


def _replace(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def _sliced(
    module: nn.Module, rows: torch.Tensor | None = None, inputs: torch.Tensor | None = None
) -> nn.Module:
    """A copy of a Linear/Conv layer keeping output ``rows`` and input ``inputs`` (features or channels)."""
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    if rows is not None:
        weight = weight[rows]
        bias = None if bias is None else bias[rows]
    if inputs is not None:
        weight = weight[:, inputs]
    if isinstance(module, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    else:
        new = type(module)(
            weight.shape[1],
            weight.shape[0],
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            bias=bias is not None,
            padding_mode=module.padding_mode,
        )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new.to(weight.device)


def _linear_inputs_of_units(module: nn.Module, units: int, keep: torch.Tensor) -> torch.Tensor:
    """Input features of a Linear layer that belong to the kept units of a flattened ``(units, H, W)`` input."""
    group = module.in_features // units
    return keep.repeat_interleave(group)


def remove_dead_units(net: nn.Module, layers: list[Layer]) -> int:
    """Cut dead and unused units out of a chain net in place (outputs unchanged); returns how many went."""
    if not is_chain(net):
        return 0
    removed, changed = 0, True
    while changed:
        changed = False
        for producer, consumer in zip(layers, layers[1:]):
            a, b = net.get_submodule(producer.name), net.get_submodule(consumer.name)
            rows = a.weight.detach().reshape(a.weight.shape[0], -1) != 0
            if a.bias is not None:
                rows = torch.cat([rows, (a.bias.detach() != 0)[:, None]], dim=1)
            units = rows.shape[0]
            outgoing = b.weight.detach().reshape(b.weight.shape[0], units, -1) != 0
            keep = rows.any(dim=1) & outgoing.any(dim=(0, 2))
            if not bool(keep.any()):
                keep[0] = True  # a layer needs one unit to stay a valid module; its output is 0 anyway
            if bool(keep.all()):
                continue
            _replace(net, producer.name, _sliced(a, rows=keep))
            inputs = _linear_inputs_of_units(b, units, keep) if isinstance(b, nn.Linear) else keep
            _replace(net, consumer.name, _sliced(b, inputs=inputs))
            removed += int((~keep).sum())
            changed = True
    return removed
