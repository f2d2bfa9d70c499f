"""The net registry: the registered nets, and ``tv:NAME`` / ``timm:NAME`` for any torchvision or timm model
(the nets register themselves in their modules, which :mod:`pyrozoo.nets` imports)."""

from __future__ import annotations

import inspect

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from pyrozoo.errors import PyrozooError, reason
from pyrozoo.registry import Registry
from pyrozoo.torchfile import load_tensors


@dataclass(frozen=True)
class NetEntry:
    name: str
    factory: Callable[..., nn.Module]
    pad_to: int | None  # input side length the net expects; smaller images are zero-padded up to it
    description: str
    # where training starts the posterior (pyrozoo.init_from.start_from_net): "net", the means at the net's own
    # torch initialisation (any net's default); "guide", the guide's own random start (the paper's, which
    # the runs of lenet, mlp, vit and mixer in experiments/RESULTS.md were measured with)
    start: str = "net"


PREFIXES = {"tv": "torchvision", "timm": "timm"}
STARTS = ("net", "guide")
# Options every net takes: they choose what the Bayesian model makes random, not how the net is built.
MODEL_OPTIONS = ("deterministic", "random")


class NetRegistry(Registry):
    """The registered nets, and ``tv:NAME`` / ``timm:NAME`` for any torchvision or timm model."""

    def __missing__(self, name):
        prefix, _, model = name.partition(":")
        if prefix in PREFIXES and model:
            if not _library_has(prefix, model):
                raise PyrozooError(f"{PREFIXES[prefix]} has no model {model!r}")
            factory = _torchvision if prefix == "tv" else _timm
            return NetEntry(
                name, _bind(factory, model), 32, f"{PREFIXES[prefix]} {model}, no pretrained weights"
            )
        try:
            return super().__missing__(name)
        except PyrozooError as e:
            raise PyrozooError(f"{e}; or tv:NAME / timm:NAME for a torchvision or timm model") from None

    def __contains__(self, name) -> bool:
        if dict.__contains__(self, name):
            return True
        prefix, _, model = str(name).partition(":")
        return prefix in PREFIXES and bool(model) and _library_has(prefix, model)


def _library_has(prefix: str, model: str) -> bool:
    if prefix == "tv":
        import torchvision

        return model in torchvision.models.list_models()
    import timm

    return model in timm.list_models()


def _bind(factory, model: str):
    def build(*, in_channels: int, image_size: int, num_classes: int, weights: str | None = None):
        net = factory(model, in_channels, num_classes)
        if weights is not None:
            try:
                state = load_tensors(
                    weights, what=f"weights={weights}", fix="save the net's state_dict instead"
                )
            except PyrozooError:
                raise
            except Exception as e:  # a missing file, a truncated zip, random bytes: torch raises many kinds
                raise TypeError(f"cannot load weights {weights!r}: {reason(e)}") from None
            net.load_state_dict(state)
        return net

    build.__doc__ = f"{model}; ``weights``: a local state-dict file to start from (nothing is downloaded)."
    return build


def _torchvision(model: str, in_channels: int, num_classes: int) -> nn.Module:
    import torchvision

    net = torchvision.models.get_model(model, weights=None, num_classes=num_classes)
    if in_channels != 3:  # torchvision models take RGB: the first conv takes the data's channels instead
        for name, module in net.named_modules():
            if isinstance(module, nn.Conv2d) and module.in_channels == 3:
                parent, _, child = name.rpartition(".")
                setattr(
                    net.get_submodule(parent) if parent else net,
                    child,
                    nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride,
                              module.padding, module.dilation, module.groups, module.bias is not None),
                )  # fmt: skip
                break
    return net


def _timm(model: str, in_channels: int, num_classes: int) -> nn.Module:
    import os

    import timm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    return timm.create_model(model, pretrained=False, num_classes=num_classes, in_chans=in_channels)


NETS = NetRegistry("net")


def register_net(name: str, *, pad_to: int | None = None, description: str = "", start: str = "net"):
    """Decorator adding a net factory to the registry under ``name``; ``start`` says where training starts
    its posterior by default (:class:`NetEntry`)."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")

    def decorate(factory):
        NETS.register(
            name,
            NetEntry(
                name, factory, pad_to, description or (factory.__doc__ or "").strip().split("\n")[0], start
            ),
        )
        return factory

    return decorate


DATA_SHAPE = ("in_channels", "image_size", "num_classes")


def net_options(name: str) -> list[str]:
    """The options a registered net takes: its factory's keyword parameters, less the data's shape."""
    parameters = inspect.signature(NETS[name].factory).parameters.values()
    own = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in DATA_SHAPE]
    return own + list(MODEL_OPTIONS)


def model_options(options: dict) -> tuple[dict, dict]:
    """Net options split into the factory's and the Bayesian model's (``deterministic``, ``random``)."""
    model = {k: v for k, v in options.items() if k in MODEL_OPTIONS}
    return {k: v for k, v in options.items() if k not in MODEL_OPTIONS}, model


def create_net(name: str, *, in_channels: int, image_size: int, num_classes: int, **overrides) -> nn.Module:
    """Build the registered net ``name`` for the given input shape; ``overrides`` change its default sizes.

    This is the one place where a net's options are checked: options the factory refuses, or that build a
    net which cannot map a batch of the data's shape to ``num_classes`` logits (a negative depth, fractional
    channels, a patch size of 0), are a PyrozooError naming the options, never a traceback from deep inside
    torch or timm. The data's shape is not a net option.
    """
    entry = NETS[name]
    fixed = [key for key in DATA_SHAPE if key in overrides]
    if fixed:
        raise PyrozooError(
            f"net {name!r}: {', '.join(fixed)} comes from the data ({in_channels} channels, {image_size} x "
            f"{image_size} images, {num_classes} classes), not from a net option"
        )
    takes = net_options(name)
    unknown = [key for key in overrides if key not in takes]
    if unknown:
        raise PyrozooError(
            f"net {name!r} takes no option {unknown[0]!r}; its options: {', '.join(takes) or 'none'}"
        )
    overrides, _ = model_options(overrides)  # for the Bayesian model, not the factory
    shown = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    try:
        net = entry.factory(
            in_channels=in_channels, image_size=image_size, num_classes=num_classes, **overrides
        )
        if overrides:  # a net that builds may still be unusable: try it once on a batch of the data's shape
            training = net.training
            net.eval()
            with torch.no_grad():
                out = net(torch.zeros(2, in_channels, image_size, image_size))
            net.train(training)
            if tuple(out.shape) != (2, num_classes):
                raise ValueError(
                    f"it maps images to outputs of shape {tuple(out.shape[1:])}, not ({num_classes},)"
                )
    except PyrozooError:
        raise
    except (TypeError, ValueError, RuntimeError, ZeroDivisionError, AssertionError, IndexError) as e:
        why = reason(e)
        if overrides:
            raise PyrozooError(
                f"net {name!r} cannot be built with the net options {shown} ({why}): check --net-option"
            ) from None
        raise PyrozooError(
            f"net {name!r} cannot be built for this data's {image_size}x{image_size} images ({why}): pad them to "
            "the net's size (pyrozoo compress --pad-to), or give the net other sizes (--net-option)"
        ) from None
    return net
