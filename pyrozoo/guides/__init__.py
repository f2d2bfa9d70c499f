"""Posterior families. Every guide exposes ``posterior() -> {site: (loc, scale)}``, the one thing BMR reads."""

from __future__ import annotations

from pyrozoo.errors import PyrozooError
from pyrozoo.guides.auto import AutoDeltaGuide, AutoNormalGuide
from pyrozoo.guides.meanfield import MeanFieldNormal

GUIDES = {
    "meanfield": MeanFieldNormal,
    "autonormal": AutoNormalGuide,
    "autodelta": AutoDeltaGuide,
}


def make_guide(kind: str, model, *init_args, **init_kwargs):
    """Build guide ``kind`` for ``model``; ``init_args`` (one model call's arguments) set up lazy autoguides
    so their parameters exist before an optimiser is made."""
    try:
        cls = GUIDES[kind]
    except KeyError:
        raise PyrozooError(f"unknown guide {kind!r}; known guides: {', '.join(GUIDES)}") from None
    guide = cls(model)
    if init_args or init_kwargs:
        from pyro import poutine

        with poutine.block():
            guide(*init_args, **init_kwargs)
    return guide


__all__ = ["AutoDeltaGuide", "AutoNormalGuide", "GUIDES", "MeanFieldNormal", "make_guide"]
