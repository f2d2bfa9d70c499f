"""Which parameters of a net are random, and how they are grouped into one latent per layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from pyrozoo.errors import PyrozooError

# Module types whose weight and bias become one random matrix (bias = one more input column).
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Layer:
    """One random group: a module's weight (flattened to ``(out, fan_in)``) with its bias as an extra column."""

    name: str  # the module's path in the net, e.g. "features.0"
    weight_shape: torch.Size
    has_bias: bool
    is_output: bool
    prunable: bool
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @property
    def fan_in(self) -> int:
        return self.weight_shape[1:].numel()

    @property
    def shape(self) -> torch.Size:
        """Shape of the latent ``z``: output rows by inputs (+1 for the bias)."""
        return torch.Size((self.weight_shape[0], self.fan_in + int(self.has_bias)))

    @property
    def site(self) -> str:
        """Name of the standard-normal latent site of this layer."""
        return f"{self.name}.weight_base"

    def const(self, value: float) -> torch.Tensor:
        return torch.tensor(value, device=self.device, dtype=self.dtype)

    def on(self, device: torch.device, dtype: torch.dtype) -> "Layer":
        return dataclasses.replace(self, device=device, dtype=dtype)

    def split(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The module's parameters (``weight`` and ``bias``) from a latent-shaped matrix ``w``."""
        params = {f"{self.name}.weight": w[:, : self.fan_in].reshape(self.weight_shape)}
        if self.has_bias:
            params[f"{self.name}.bias"] = w[:, self.fan_in]
        return params

    def join(self, module: nn.Module) -> torch.Tensor:
        """The inverse of :meth:`split`: the module's weight and bias as one ``(out, fan_in [+1])`` matrix."""
        w = module.weight.detach().reshape(self.weight_shape[0], -1)
        if self.has_bias:
            w = torch.cat([w, module.bias.detach()[:, None]], dim=1)
        return w


def find_layers(net: nn.Module, output: str | None = None) -> list[Layer]:
    """Group the net's parameters by layer, in registration order.

    ``output`` names the output layer (never pruned); by default the module called ``head`` if there is one,
    else the last weight layer. A module type holding parameters that pyrozoo cannot make random is an error.
    """
    modules = dict(net.named_modules())
    weight_names = [name for name, m in modules.items() if isinstance(m, WEIGHT_LAYERS)]
    if not weight_names:
        raise PyrozooError(f"{type(net).__name__} has no Linear or Conv layers to make random")
    for name, m in modules.items():
        if not isinstance(m, WEIGHT_LAYERS) and any(True for _ in m.parameters(recurse=False)):
            raise PyrozooError(
                f"cannot make layer {name!r} of type {type(m).__name__} random: pyrozoo handles "
                f"{', '.join(t.__name__ for t in WEIGHT_LAYERS)}"
            )
    if output is None:
        output = "head" if "head" in weight_names else weight_names[-1]
    if output not in weight_names:
        raise PyrozooError(f"output layer {output!r} is not one of the net's weight layers: {weight_names}")
    return [
        Layer(
            name=name,
            weight_shape=modules[name].weight.shape,
            has_bias=modules[name].bias is not None,
            is_output=name == output,
            prunable=name != output,
            device=modules[name].weight.device,
            dtype=modules[name].weight.dtype,
        )
        for name in weight_names
    ]
