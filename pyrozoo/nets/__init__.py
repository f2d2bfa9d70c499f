"""Plain deterministic networks behind a registry.

A net factory takes the data's shape (``in_channels``, ``image_size``, ``num_classes``) plus keyword overrides
of its sizes, and returns an ``nn.Module`` mapping images ``(B, C, H, W)`` to logits ``(B, num_classes)``::

    net = create_net("lenet", in_channels=1, image_size=32, num_classes=10, channels=(8, 16, 120))
"""

from __future__ import annotations

import inspect

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from pyrozoo.errors import PyrozooError, reason
from pyrozoo.registry import Registry


@dataclass(frozen=True)
class NetEntry:
    name: str
    factory: Callable[..., nn.Module]
    pad_to: int | None  # input side length the net expects; smaller images are zero-padded up to it
    description: str


NETS = Registry("net")


def register_net(name: str, *, pad_to: int | None = None, description: str = ""):
    """Decorator adding a net factory to the registry under ``name``."""

    def decorate(factory):
        NETS.register(
            name,
            NetEntry(name, factory, pad_to, description or (factory.__doc__ or "").strip().split("\n")[0]),
        )
        return factory

    return decorate


DATA_SHAPE = ("in_channels", "image_size", "num_classes")


def net_options(name: str) -> list[str]:
    """The options a registered net takes: its factory's keyword parameters, less the data's shape."""
    parameters = inspect.signature(NETS[name].factory).parameters.values()
    return [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.name not in DATA_SHAPE]


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
        what = f"with the net options {shown}" if overrides else "for this data"
        raise PyrozooError(f"net {name!r} cannot be built {what} ({why}): check --net-option") from None
    return net


# Importing the modules registers their nets.
from pyrozoo.nets import lenet, mixer, mlp, resnet, vit  # noqa: E402,F401
