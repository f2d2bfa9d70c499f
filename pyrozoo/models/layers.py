"""Which parameters of a net are random, and how they are grouped into one latent per layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from pyrozoo.errors import PyrozooError

# Module types whose weight and bias become one random matrix (bias = one more input column).
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Normalisation layers with a per-feature gain and bias and no running statistics: one row per feature.
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm)
# The kinds of random group; by default only "weight" groups (other than the output layer) may be pruned.
KINDS = ("weight", "norm", "tensor")


@dataclass(frozen=True)
class Layer:
    """One random group, flattened to a matrix (the latent ``z``'s shape, :attr:`shape`).

    ``kind`` is ``"weight"`` for a Linear/Conv module (weight as ``(out, fan_in)``, bias as one more column),
    ``"norm"`` for a LayerNorm/GroupNorm (one row per feature: gain, then bias) and ``"tensor"`` for a free
    parameter such as a ViT's class token or position embedding (rows along all but its last dimension).
    """

    name: str  # the module's path in the net ("features.0"), or the free parameter's ("pos_embed")
    weight_shape: torch.Size
    has_bias: bool
    is_output: bool
    prunable: bool
    kind: str = "weight"
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def weight_name(self) -> str:
        """The net parameter holding the weight (the whole tensor for a free parameter)."""
        return self.name if self.kind == "tensor" else f"{self.name}.weight"

    @property
    def rows(self) -> int:
        if self.kind == "tensor":
            return self.weight_shape[:-1].numel()
        return self.weight_shape[0]

    @property
    def fan_in(self) -> int:
        return self.weight_shape.numel() // self.rows

    @property
    def shape(self) -> torch.Size:
        """Shape of the latent ``z``: rows by inputs (+1 for the bias)."""
        return torch.Size((self.rows, self.fan_in + int(self.has_bias)))

    @property
    def site(self) -> str:
        """Name of the standard-normal latent site of this layer."""
        return f"{self.name}.weight_base"

    def const(self, value: float) -> torch.Tensor:
        return torch.tensor(value, device=self.device, dtype=self.dtype)

    def on(self, device: torch.device, dtype: torch.dtype) -> "Layer":
        return dataclasses.replace(self, device=device, dtype=dtype)

    def split(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The net's parameters (weight, and bias if any) from a latent-shaped matrix ``w``."""
        params = {self.weight_name: w[:, : self.fan_in].reshape(self.weight_shape)}
        if self.has_bias:
            params[f"{self.name}.bias"] = w[:, self.fan_in]
        return params

    def join(self, net: nn.Module) -> torch.Tensor:
        """The inverse of :meth:`split`: the net's current weight (and bias) as one latent-shaped matrix."""
        w = net.get_parameter(self.weight_name).detach().reshape(self.rows, self.fan_in)
        if self.has_bias:
            w = torch.cat([w, net.get_parameter(f"{self.name}.bias").detach()[:, None]], dim=1)
        return w


def _group(name: str, module: nn.Module) -> tuple[str, torch.Tensor, bool] | None:
    """``(kind, weight, has_bias)`` of a supported module holding parameters, else None."""
    if isinstance(module, WEIGHT_LAYERS):
        return "weight", module.weight, module.bias is not None
    if isinstance(module, NORM_LAYERS) and module.weight is not None:
        return "norm", module.weight, module.bias is not None
    return None


def find_layers(
    net: nn.Module, output: str | None = None, prunable_kinds: tuple[str, ...] = ("weight",)
) -> list[Layer]:
    """Group the net's parameters into random layers, in registration order.

    Linear/Conv modules give ``"weight"`` groups, LayerNorm/GroupNorm ``"norm"`` groups, and parameters held
    directly by a container module (a ViT's ``cls_token``, ``pos_embed``) ``"tensor"`` groups. ``output`` names
    the output layer (never pruned); by default the weight layer called ``head`` if there is one, else the last
    weight layer. Groups of the ``prunable_kinds`` may be pruned. A leaf module of another type holding
    parameters (BatchNorm, Embedding, ...) is an error naming it.
    """
    unknown = set(prunable_kinds) - set(KINDS)
    if unknown:
        raise PyrozooError(f"unknown prunable kinds {sorted(unknown)}; kinds are {', '.join(KINDS)}")
    groups: list[tuple[str, str, torch.Tensor, bool]] = []
    for name, module in net.named_modules():
        direct = list(module.named_parameters(recurse=False))
        if not direct:
            continue
        found = _group(name, module)
        if found is not None:
            kind, weight, has_bias = found
            groups.append((name, kind, weight, has_bias))
            continue
        if not any(True for _ in module.children()):
            raise PyrozooError(
                f"cannot make layer {name!r} of type {type(module).__name__} random: pyrozoo handles "
                f"{', '.join(t.__name__ for t in WEIGHT_LAYERS + NORM_LAYERS)} and free parameters of "
                "container modules (class tokens, position embeddings)"
            )
        for param_name, param in direct:
            groups.append((f"{name}.{param_name}" if name else param_name, "tensor", param, False))
    weight_names = [name for name, kind, _, _ in groups if kind == "weight"]
    if not weight_names:
        raise PyrozooError(f"{type(net).__name__} has no Linear or Conv layers to make random")
    if output is None:
        output = "head" if "head" in weight_names else weight_names[-1]
    if output not in weight_names:
        raise PyrozooError(f"output layer {output!r} is not one of the net's weight layers: {weight_names}")
    return [
        Layer(
            name=name,
            weight_shape=weight.shape,
            has_bias=has_bias,
            is_output=name == output,
            prunable=name != output and kind in prunable_kinds,
            kind=kind,
            device=weight.device,
            dtype=weight.dtype,
        )
        for name, kind, weight, has_bias in groups
    ]
