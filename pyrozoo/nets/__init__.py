"""Plain deterministic networks behind a registry.

A net factory takes the data's shape (``in_channels``, ``image_size``, ``num_classes``) plus keyword overrides
of its sizes, and returns an ``nn.Module`` mapping images ``(B, C, H, W)`` to logits ``(B, num_classes)``::

    net = create_net("lenet", in_channels=1, image_size=32, num_classes=10, channels=(8, 16, 120))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from pyrozoo.errors import PyrozooError
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


def create_net(name: str, *, in_channels: int, image_size: int, num_classes: int, **overrides) -> nn.Module:
    """Build the registered net ``name`` for the given input shape; ``overrides`` change its default sizes."""
    entry = NETS[name]
    try:
        return entry.factory(
            in_channels=in_channels, image_size=image_size, num_classes=num_classes, **overrides
        )
    except TypeError as e:
        raise PyrozooError(f"net {name!r}: {e}") from None


# Importing the modules registers their nets.
from pyrozoo.nets import lenet, mixer, mlp, vit  # noqa: E402,F401
