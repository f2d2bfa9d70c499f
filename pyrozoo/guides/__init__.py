"""Posterior families, all behind one contract (:class:`~pyrozoo.guides.base.Posterior`): BMR, rebuild,
export and training read ``posterior()``, ``mean()`` and ``point_mass`` and write back with ``write_posterior``
and ``reset_to_prior``, whatever the guide."""

from __future__ import annotations

from pyro import poutine

from pyrozoo.guides.auto import AutoDeltaGuide, AutoNormalGuide
from pyrozoo.guides.base import Posterior
from pyrozoo.guides.ivon import IVONPosterior
from pyrozoo.guides.meanfield import MeanFieldNormal
from pyrozoo.options import build_with_options
from pyrozoo.registry import Registry

GUIDES = Registry("guide")
GUIDES.register("meanfield", MeanFieldNormal)
GUIDES.register("autonormal", AutoNormalGuide)
GUIDES.register("autodelta", AutoDeltaGuide)
GUIDES.register("ivon", IVONPosterior)


def make_guide(kind: str, model, *init_args, options: dict | None = None, **init_kwargs) -> Posterior:
    """Build guide ``kind`` for ``model`` with its ``options`` (keyword arguments of its class, checked); no data
    is needed.

    ``init_args`` (one model call's arguments, as callers passed when autoguides were set up lazily) are
    optional: given, the guide draws one blocked sample with them, which keeps a run's random stream, and so
    every recorded result, as it was.
    """
    guide = build_with_options(f"guide {kind!r}", GUIDES[kind], options or {}, model)
    if init_args or init_kwargs:
        with poutine.block():
            guide(*init_args, **init_kwargs)
    return guide


__all__ = [
    "AutoDeltaGuide",
    "AutoNormalGuide",
    "GUIDES",
    "IVONPosterior",
    "MeanFieldNormal",
    "Posterior",
    "make_guide",
]
