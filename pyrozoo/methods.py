"""Named recipes: which prior, which guide, which learning rate and how many posterior samples to predict with.

A method is data; adding one is adding one entry to ``METHODS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pyrozoo.errors import PyrozooError
from pyrozoo.models.priors import flat, tiered


@dataclass(frozen=True)
class Method:
    name: str
    prior: Callable
    guide: str  # a key of pyrozoo.guides.GUIDES
    lr: float  # learning rate (PAPER.md §3)
    samples: int  # posterior samples averaged at test time
    description: str
    rule: str | None = None  # BMR pass after every epoch but the last (pyrozoo.bmr.REDUCTIONS)
    warmup_steps: int = 0  # SVI steps before the first BMR pass
    net_options: dict = field(default_factory=dict)  # e.g. dropout, passed to the net factory
    optimizer: str = "adam"  # a key of pyrozoo.optim.OPTIMIZERS (PAPER.md §3 allows Adam for AdaBelief)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "flat-map",
            flat,
            "autodelta",
            1e-3,
            1,
            "flat prior, point-mass posterior (MAP), dropout 0.2",
            net_options={"dropout": 0.2},
        ),
        Method("flat-ff", flat, "meanfield", 5e-3, 100, "flat prior, fully factorised Normal posterior"),
        Method(
            "tiered-ff",
            tiered,
            "meanfield",
            5e-3,
            100,
            "regularised-horseshoe (tiered) prior, fully factorised posterior (log-normal on scales)",
        ),
        Method(
            "bmr-ss",
            flat,
            "meanfield",
            1e-2,
            100,
            "flat-ff pruned by stochastic BMR, spike-and-slab rule",
            rule="spike-and-slab",
            warmup_steps=500,
        ),
        Method(
            "bmr-th",
            flat,
            "meanfield",
            1e-2,
            100,
            "flat-ff pruned by stochastic BMR, threshold rule (prune iff dF > 0)",
            rule="threshold",
            warmup_steps=500,
        ),
        Method(
            "bmr-lss",
            flat,
            "meanfield",
            1e-2,
            100,
            "flat-ff pruned by stochastic BMR, spike-and-slab over each whole layer, never keeping dF > 0",
            rule="layer-spike-and-slab",
            warmup_steps=500,
        ),
        Method(
            "bmr-rhs",
            flat,
            "meanfield",
            1e-2,
            100,
            "flat-ff reduced by a regularised horseshoe fitted to dF (BMR-RHS)",
            rule="horseshoe",
            warmup_steps=500,
        ),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise PyrozooError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}") from None
