"""Which parameters of a net are random, which stay deterministic, and how random ones group into latents.

Every module holding parameters is either random (its parameters become one latent matrix, a :class:`Layer`) or
deterministic (its parameters stay plain point estimates, trained with the guide; its buffers, such as
BatchNorm's running statistics, follow train/eval mode as in torch). Selectors decide which, by module type or
by name, in the shape of TyXe's hide/expose:

- ``deterministic=[nn.Embedding, "head", "layer1.*"]`` keeps those modules deterministic;
- ``random=[nn.BatchNorm2d]`` makes modules random that would be deterministic by default.

A selector is a module class (matched with ``isinstance``), or a string matched against the module's path
(exact, a prefix ending at a dot, or an ``fnmatch`` pattern) or the name of its class or a base class
(``"BatchNorm2d"``). By default BatchNorm layers (anything with ``running_mean`` and ``running_var``) are
deterministic and everything pyrozoo can make random is random. A module holding parameters that can be neither
is an error naming the selector to use.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass
from typing import Iterable, Union

import torch
from torch import nn

from pyrozoo.errors import PyrozooError

# Module types whose weight and bias become one random matrix (bias = one more input column).
CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + CONV_TRANSPOSE
# Normalisation layers with a per-feature gain and bias and no running statistics: one row per feature.
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm)
RNN_LAYERS = (nn.RNN, nn.LSTM, nn.GRU)
# The kinds of random group; by default only "weight" groups (other than the output layer) may be pruned.
KINDS = ("weight", "norm", "tensor", "embedding")

Selector = Union[type, str]


def is_batch_norm(module: nn.Module) -> bool:
    """BatchNorm of torch, timm or anyone: running statistics that a random affine would not fit."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or (
        hasattr(module, "running_mean") and hasattr(module, "running_var")
    )


def matches(selector: Selector, path: str, module: nn.Module) -> bool:
    """Whether ``selector`` (a class, or a path / pattern / class name) selects the module at ``path``."""
    if isinstance(selector, type):
        return isinstance(module, selector)
    if not isinstance(selector, str):
        raise PyrozooError(f"a selector is a module class or a name, got {selector!r}")
    if path == selector or path.startswith(selector + ".") or fnmatch.fnmatchcase(path, selector):
        return True
    return any(selector in (cls.__name__, f"nn.{cls.__name__}") for cls in type(module).__mro__)


def parse_selectors(value) -> tuple[Selector, ...]:
    """Selectors from the Python API (a list) or a net option (``"head,layer1.*"``)."""
    if value is None:
        return ()
    if isinstance(value, (str, type)):
        value = [value]
    out = []
    for item in value:
        if isinstance(item, str):
            out += [part.strip() for part in item.split(",") if part.strip()]
        else:
            out.append(item)
    return tuple(out)


@dataclass(frozen=True)
class Layer:
    """One random group, flattened to a matrix (the latent ``z``'s shape, :attr:`shape`).

    ``kind`` is ``"weight"`` for a Linear/Conv/ConvTranspose module, an RNN's input or hidden weights of one
    layer and direction, or MultiheadAttention's input projection (weight as ``(out, fan_in)``, bias as one
    more column; a transposed conv's rows are its output channels), ``"norm"`` for a LayerNorm/GroupNorm (or a
    BatchNorm made random: one row per feature, gain then bias), ``"embedding"`` for an Embedding (a row per
    token) and ``"tensor"`` for a free parameter such as a ViT's class token (rows along all but its last
    dimension). ``weight_name`` and ``bias_name`` are the net parameters it holds.
    """

    name: str  # the module's path in the net ("features.0"), or the parameter's ("pos_embed", "rnn.weight_ih_l0")
    weight_shape: torch.Size
    has_bias: bool
    is_output: bool
    prunable: bool
    kind: str = "weight"
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    weight_param: str | None = None  # default: "<name>.weight" (the name itself for a tensor)
    bias_param: str | None = None  # default: "<name>.bias"
    transposed: bool = False  # weight stored (in, out, ...): rows are its dimension 1

    @property
    def weight_name(self) -> str:
        """The net parameter holding the weight (the whole tensor for a free parameter)."""
        if self.weight_param is not None:
            return self.weight_param
        return self.name if self.kind == "tensor" else f"{self.name}.weight"

    @property
    def bias_name(self) -> str:
        return self.bias_param if self.bias_param is not None else f"{self.name}.bias"

    @property
    def rows(self) -> int:
        if self.kind == "tensor":
            return self.weight_shape[:-1].numel()
        return self.weight_shape[1] if self.transposed else self.weight_shape[0]

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
        """The net's parameters (weight, and bias if any) from a latent-shaped matrix ``w``.

        Where autograd records it (a tensor that needs a gradient, outside torch.func's transforms) by
        :class:`_SplitBias`, whose backward writes the latent's gradient in one pass; elsewhere by
        ``torch.split``. Two slices' backwards would each fill a zeroed latent-sized tensor for autograd to add,
        and ``torch.split``'s concatenates the column of biases element by element (both the same values)."""
        if self.has_bias and w.requires_grad and torch.is_grad_enabled() and not in_transform(w):
            weight, bias = _SplitBias.apply(w, self.fan_in)
        elif self.has_bias:
            weight, bias = w.split([self.fan_in, 1], dim=1)
        else:
            weight, bias = w, None
        if self.transposed:
            s = self.weight_shape
            weight = weight.reshape(s[1], s[0], *s[2:]).transpose(0, 1)
        params = {self.weight_name: weight.reshape(self.weight_shape)}
        if bias is not None:
            params[self.bias_name] = bias.squeeze(1)
        return params

    def join(self, net: nn.Module) -> torch.Tensor:
        """The inverse of :meth:`split`: the net's current weight (and bias) as one latent-shaped matrix."""
        w = net.get_parameter(self.weight_name).detach()
        w = (w.transpose(0, 1) if self.transposed else w).reshape(self.rows, self.fan_in)
        if self.has_bias:
            w = torch.cat([w, net.get_parameter(self.bias_name).detach()[:, None]], dim=1)
        return w


def in_transform(w: torch.Tensor) -> bool:
    """Whether ``w`` is inside a torch.func transform (vmap, jvp, grad), which custom autograd nodes don't enter."""
    return torch._C._functorch.is_functorch_wrapped_tensor(w)


class _SplitBias(torch.autograd.Function):
    """A latent ``(rows, fan_in + 1)`` as its weight columns and its bias column (views), with the backward
    that writes the latent's gradient in one pass: the weight's gradient into the first columns of one new
    tensor, the bias's into the last (Layer.split says what it replaces)."""

    @staticmethod
    def forward(ctx, w, fan_in):
        ctx.fan_in = fan_in
        # the weight copied out (a pass the size of the weights): a view with the latent's row stride would come
        # back from a linear layer's backward as a column-major gradient (torch recognises only a contiguous
        # weight's transpose), whose transposing copy into the latent's gradient costs more than the net's GEMM
        return w[:, :fan_in].contiguous(), w[:, fan_in:]

    @staticmethod
    def backward(ctx, grad_weight, grad_bias):
        fan_in = ctx.fan_in
        rows = grad_weight.shape[0] if grad_weight is not None else grad_bias.shape[0]
        like = grad_weight if grad_weight is not None else grad_bias
        grad = like.new_empty(rows, fan_in + 1)
        for part, value in ((grad[:, :fan_in], grad_weight), (grad[:, fan_in:], grad_bias)):
            part.copy_(value) if value is not None else part.zero_()
        return grad, None


def _rnn_groups(name: str, module: nn.Module):
    """An RNN's weights, one group per layer, direction and input (``ih``) or hidden (``hh``) side."""
    for param_name, param in module.named_parameters(recurse=False):
        if param_name.startswith("weight_"):
            bias = "bias_" + param_name[len("weight_") :]
            has_bias = getattr(module, bias, None) is not None
            yield f"{name}.{param_name}", "weight", param, has_bias, f"{name}.{param_name}", f"{name}.{bias}"
        elif not param_name.startswith("bias_"):
            raise PyrozooError(
                f"cannot make parameter {param_name!r} of {name!r} ({type(module).__name__}) random: keep it "
                f"deterministic with deterministic=[{name!r}]"
            )


def _groups_of(name: str, module: nn.Module, random_norms: bool):
    """``(group name, kind, weight, has_bias, weight param, bias param)`` of a module made random, or None if
    pyrozoo cannot make it random."""
    prefix = f"{name}." if name else ""
    if isinstance(module, WEIGHT_LAYERS):
        return [(name, "weight", module.weight, module.bias is not None, None, None)]
    if isinstance(module, NORM_LAYERS) or (random_norms and is_batch_norm(module)):
        if getattr(module, "weight", None) is None:
            return []
        return [(name, "norm", module.weight, getattr(module, "bias", None) is not None, None, None)]
    if isinstance(module, nn.Embedding):
        return [(name, "embedding", module.weight, False, None, None)]
    if isinstance(module, RNN_LAYERS):
        return list(_rnn_groups(name, module))
    if isinstance(module, nn.MultiheadAttention):
        if module.in_proj_weight is None:  # separate q, k, v projections: three free tensors
            return [
                (f"{prefix}{p}", "weight", getattr(module, p), False, f"{prefix}{p}", None)
                for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight")
            ] + _extra_tensors(prefix, module, {"q_proj_weight", "k_proj_weight", "v_proj_weight"})
        has_bias = module.in_proj_bias is not None
        groups = [(f"{prefix}in_proj", "weight", module.in_proj_weight, has_bias, f"{prefix}in_proj_weight",
                   f"{prefix}in_proj_bias")]  # fmt: skip
        return groups + _extra_tensors(prefix, module, {"in_proj_weight", "in_proj_bias"})
    return None


def _extra_tensors(prefix: str, module: nn.Module, taken: set[str]):
    return [
        (f"{prefix}{p}", "tensor", value, False, None, None)
        for p, value in module.named_parameters(recurse=False)
        if p not in taken
    ]


def find_layers(
    net: nn.Module,
    output: str | None = None,
    prunable_kinds: tuple[str, ...] = ("weight",),
    deterministic: Iterable[Selector] = (),
    random: Iterable[Selector] = (),
) -> list[Layer]:
    """Group the net's random parameters into layers, in registration order (see the module docstring).

    Linear/Conv/ConvTranspose modules, RNN weights and attention input projections give ``"weight"`` groups,
    LayerNorm/GroupNorm ``"norm"`` groups, Embeddings ``"embedding"`` groups, and parameters held directly by a
    container module (a ViT's ``cls_token``) ``"tensor"`` groups. A parameter shared by two modules (tied
    weights) is one group, that of the first module holding it; a module registered under two names is one
    module. ``output`` names the output layer (never pruned); by default the weight layer called ``head`` if
    there is one, else the last weight layer. Groups of the ``prunable_kinds`` may be pruned.
    """
    unknown = set(prunable_kinds) - set(KINDS)
    if unknown:
        raise PyrozooError(f"unknown prunable kinds {sorted(unknown)}; kinds are {', '.join(KINDS)}")
    deterministic, random = parse_selectors(deterministic), parse_selectors(random)
    _check_selectors(net, deterministic, random)
    groups = _random_groups(net, deterministic, random)
    output = _output_name(net, groups, output)
    layers = []
    for gname, kind, weight, has_bias, wparam, bparam in groups:
        module = net.get_submodule(gname) if wparam is None and kind != "tensor" else None
        transposed = isinstance(module, CONV_TRANSPOSE) and module.groups == 1
        layers.append(
            Layer(
                name=gname,
                weight_shape=weight.shape,
                has_bias=has_bias,
                is_output=gname == output,
                prunable=gname != output and kind in prunable_kinds,
                kind=kind,
                device=weight.device,
                dtype=weight.dtype,
                weight_param=wparam,
                bias_param=bparam,
                transposed=transposed,
            )
        )
    return layers


def _check_selectors(net: nn.Module, deterministic: tuple, random: tuple) -> None:
    """Refuse a selector that selects no module of ``net``: that is a typo, not a choice."""
    for which, selectors in (("deterministic", deterministic), ("random", random)):
        for selector in selectors:
            if not any(matches(selector, name, module) for name, module in net.named_modules()):
                raise PyrozooError(
                    f"{which} selector {selector!r} matches no module of {type(net).__name__} (a module name, "
                    "pattern, class or class name)"
                )


def _random_groups(net: nn.Module, deterministic: tuple, random: tuple) -> list[tuple]:
    """``(group name, kind, weight, has_bias, weight param, bias param)`` of every random group, in
    registration order; a parameter tied to an earlier group's is not a group again."""
    groups: list[tuple] = []
    claimed: dict[int, str] = {}  # id of a parameter -> the group holding it (tied weights)
    for name, module in net.named_modules():
        direct = [(p, v) for p, v in module.named_parameters(recurse=False)]
        if not direct:
            continue
        hide = [s for s in deterministic if matches(s, name, module)]
        expose = [s for s in random if matches(s, name, module)]
        if hide and expose:
            raise PyrozooError(
                f"module {name!r} is selected both deterministic (by {hide[0]!r}) and random (by {expose[0]!r})"
            )
        if hide or (is_batch_norm(module) and not expose):
            continue  # deterministic: a point estimate, or running statistics that follow train/eval mode
        found = _groups_of(name, module, random_norms=bool(expose))
        if found is None:
            if any(True for _ in module.children()):  # a container's own parameters: free tensors
                found = _extra_tensors(f"{name}." if name else "", module, set())
            else:
                raise PyrozooError(
                    f"cannot make layer {name!r} of type {type(module).__name__} random: pyrozoo handles "
                    f"{', '.join(t.__name__ for t in WEIGHT_LAYERS + NORM_LAYERS + RNN_LAYERS)}, Embedding, "
                    "MultiheadAttention and free parameters of container modules; keep it deterministic with "
                    f"deterministic=[{name!r}] (or --net-option deterministic={name})"
                )
        for group in found:
            gname, kind, weight, has_bias, wparam, bparam = group
            if id(weight) in claimed:  # tied to an earlier group: only the rest (a bias) is new
                if has_bias:
                    bias = net.get_parameter(bparam or f"{gname}.bias")
                    if id(bias) not in claimed:
                        bias_name = bparam or f"{gname}.bias"
                        groups.append((bias_name, "tensor", bias, False, None, None))
                        claimed[id(bias)] = bias_name
                continue
            claimed[id(weight)] = gname
            groups.append(group)
    return groups


def _output_name(net: nn.Module, groups: list[tuple], output: str | None) -> str:
    """The output layer's name: ``output`` if given (checked), else the weight layer ``head`` if there is one,
    else the last weight layer."""
    weight_names = [g[0] for g in groups if g[1] == "weight"]
    if not weight_names:
        raise PyrozooError(f"{type(net).__name__} has no random weight layers")
    if output is None:
        output = "head" if "head" in weight_names else weight_names[-1]
    if output not in weight_names:
        raise PyrozooError(f"output layer {output!r} is not one of the net's weight layers: {weight_names}")
    return output
