"""Units (neurons, channels, attention heads): which are dead after pruning, and how to cut them out of a net.

A unit is a set of rows of a *producer* layer's latent whose output reaches a set of columns of a *consumer*
layer, and nothing else. If every weight and bias in its deciding rows is pruned, the unit outputs exactly 0
(dead) and its consumer columns are as good as pruned; if every consumer column is pruned, it is unused. Either
way it can be cut out without changing the net's output. Three structures are recognised:

- chain nets (``chain = True``: MLP, LeNet), where each weight layer feeds the next through activations and
  pooling that map 0 to 0: a unit is a neuron or channel, its consumer columns the next layer's inputs from it
  (a kernel's worth after a conv, a flattened map's worth for a linear after a conv);
- MLP blocks (timm's ``Mlp``: ``fc1 -> act -> fc2`` with ``act(0) = 0``, as in ViT and MLP-Mixer): a unit is a
  hidden neuron;
- self-attention (timm's ``Attention``: fused ``qkv`` and ``proj``): a unit is a head. A head whose value rows are
  all pruned outputs 0 whatever it attends to; cutting it removes its query, key and value rows and its columns
  of ``proj``, and the module's head count drops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyrozoo.models.layers import Layer, find_layers


@dataclass(frozen=True)
class Units:
    """``count`` units from ``producer`` to ``consumer``; index tensors have one row per unit."""

    producer: Layer
    consumer: Layer
    deciding_rows: torch.Tensor  # (count, k): producer rows that, all pruned, make the unit dead
    rows: torch.Tensor  # (count, k'): producer rows removed with the unit
    columns: torch.Tensor  # (count, m): consumer latent columns fed by the unit
    heads_of: str | None = None  # path of the attention module whose head count shrinks

    @property
    def count(self) -> int:
        return self.rows.shape[0]

    def dead(self, producer: torch.Tensor) -> torch.Tensor:
        """Units whose deciding rows of the producer's keep-matrix are all False."""
        return ~producer[self.deciding_rows].flatten(1).any(dim=1)

    def unused(self, consumer: torch.Tensor) -> torch.Tensor:
        """Units whose consumer columns are all False."""
        return ~consumer[:, self.columns].permute(1, 0, 2).flatten(1).any(dim=1)


def _blocks(count: int, size: int) -> torch.Tensor:
    return torch.arange(count * size).reshape(count, size)


def is_chain(net: nn.Module) -> bool:
    return bool(getattr(net, "chain", False))


def _maps_zero_to_zero(module: nn.Module) -> bool:
    with torch.no_grad():
        return bool((module(torch.zeros(1)) == 0).all())


def find_units(net: nn.Module, layers: list[Layer] | None = None) -> list[Units]:
    """Every unit structure of ``net`` (see the module docstring), producers before their consumers."""
    layers = find_layers(net) if layers is None else layers
    by_name = {layer.name: layer for layer in layers}
    found = []
    if is_chain(net):
        weights = [layer for layer in layers if layer.kind == "weight"]
        for producer, consumer in zip(weights, weights[1:]):
            count = producer.rows
            block = _blocks(count, 1)
            found.append(Units(producer, consumer, block, block, _blocks(count, consumer.fan_in // count)))
        return found
    for path, module in net.named_modules():
        prefix = f"{path}." if path else ""
        children = dict(module.named_children())
        if (
            isinstance(children.get("fc1"), nn.Linear)
            and isinstance(children.get("fc2"), nn.Linear)
            and isinstance(children.get("norm", nn.Identity()), nn.Identity)
            and "act" in children
            and _maps_zero_to_zero(children["act"])
        ):
            producer, consumer = by_name[prefix + "fc1"], by_name[prefix + "fc2"]
            block = _blocks(producer.rows, 1)
            found.append(Units(producer, consumer, block, block, block))
        elif (
            isinstance(children.get("qkv"), nn.Linear)
            and isinstance(children.get("proj"), nn.Linear)
            and isinstance(children.get("norm", nn.Identity()), nn.Identity)
            and getattr(module, "gate", None) is None
            and hasattr(module, "num_heads")
            and hasattr(module, "head_dim")
        ):
            heads, size = module.num_heads, module.head_dim
            if children["qkv"].out_features != 3 * heads * size:
                continue
            qkv = torch.arange(3 * heads * size).reshape(3, heads, size).permute(1, 0, 2)  # (head, q/k/v, d)
            producer, consumer = by_name[prefix + "qkv"], by_name[prefix + "proj"]
            found.append(Units(producer, consumer, qkv[:, 2], qkv.flatten(1), _blocks(heads, size), path))
    return found


def effective_masks(model) -> dict[str, torch.Tensor]:
    """Boolean keep-masks with the outgoing weights of dead units (all inputs pruned) marked pruned too."""
    masks = {layer.name: model.mask(layer.name).bool().clone() for layer in model.layers}
    for units in find_units(model.net, model.layers):
        dead = units.dead(masks[units.producer.name])
        masks[units.consumer.name][:, units.columns[dead].flatten()] = False
    return masks


def pruned_fraction(model) -> float:
    """Pruned entries over prunable entries (PAPER.md §6), counting the outgoing weights of dead units."""
    masks = effective_masks(model)
    prunable = [layer for layer in model.layers if layer.prunable]
    total = sum(layer.shape.numel() for layer in prunable)
    kept = sum(int(masks[layer.name].sum()) for layer in prunable)
    return 1.0 - kept / total


def _replace(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def _sliced(
    module: nn.Module, rows: torch.Tensor | None = None, inputs: torch.Tensor | None = None
) -> nn.Module:
    """A copy of a Linear/Conv layer keeping output ``rows`` and ``inputs`` (features or channels, indices)."""
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


def _cut(net: nn.Module, units: Units, keep: torch.Tensor) -> None:
    producer = net.get_submodule(units.producer.name)
    consumer = net.get_submodule(units.consumer.name)
    # Conv inputs are channels (one per unit); Linear inputs are the latent's columns.
    inputs = (
        keep.nonzero().flatten() if not isinstance(consumer, nn.Linear) else units.columns[keep].flatten()
    )
    _replace(net, units.producer.name, _sliced(producer, rows=units.rows[keep].flatten()))
    _replace(net, units.consumer.name, _sliced(consumer, inputs=inputs))
    if units.heads_of is not None:
        attention = net.get_submodule(units.heads_of)
        attention.num_heads = int(keep.sum())
        if hasattr(attention, "attn_dim"):
            attention.attn_dim = attention.num_heads * attention.head_dim


def remove_dead_units(net: nn.Module) -> int:
    """Cut dead and unused units out of ``net`` in place (outputs unchanged); returns how many went.

    Zeros in the net's weights are taken as pruned entries. A layer keeps at least one unit so that it stays a
    valid module (its output is 0 anyway). Repeats until nothing changes, since cutting one layer's units can
    leave the next layer's units without inputs.
    """
    removed, changed = 0, True
    while changed:
        changed = False
        for units in find_units(net):
            nonzero_in = units.producer.join(net) != 0
            nonzero_out = units.consumer.join(net) != 0
            keep = ~units.dead(nonzero_in) & ~units.unused(nonzero_out)
            if not bool(keep.any()):
                keep[0] = True
            if bool(keep.all()):
                continue
            _cut(net, units, keep)
            removed += int((~keep).sum())
            changed = True
            break  # the other structures' layer shapes may have changed: find them afresh
    return removed
