"""Named recipes: prior + posterior family + optimiser + reduction + schedule (docs/method.md), as data.

Adding a method is adding one ``METHODS.register`` line; its reduction is a configured value, so a variant of a
rule (``bmr-lss``) is a method, not a code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pyrozoo.bmr import SpikeAndSlab, Threshold
from pyrozoo.bmr.horseshoe import Horseshoe
from pyrozoo.bmr.reduction import Reduction
from pyrozoo.models.priors import flat, gaussian, tiered
from pyrozoo.registry import Registry


@dataclass(frozen=True)
class Method:
    prior: Callable  # a prior function (pyrozoo.models.priors)
    guide: str  # a name in pyrozoo.guides.GUIDES
    lr: float  # learning rate (docs/method.md#schedule)
    samples: int  # posterior samples averaged at test time
    description: str
    reduction: Reduction | None = None  # BMR pass after every epoch but the last
    warmup_steps: int = 0  # SVI steps before the first BMR pass
    net_options: dict = field(default_factory=dict)  # e.g. dropout, passed to the net factory
    optimizer: str = "adam"  # a name in pyrozoo.optim.OPTIMIZERS (docs/method.md#schedule: Adam or AdaBelief)
    step: str = (
        "svi"  # how it trains, a name in pyrozoo.steps.STEPS: svi, or ivon (the optimiser's posterior)
    )
    # what lr measures (pyrozoo.lr_units): latent, a step of z = w / scale (the reference code's), or weight
    lr_units: str = "latent"


METHODS = Registry("method")
_BMR = dict(prior=flat, guide="meanfield", lr=1e-2, samples=100, warmup_steps=500)
METHODS.register(
    "flat-map",
    Method(
        flat,
        "autodelta",
        1e-3,
        1,
        "flat prior, point-mass posterior (MAP), dropout 0.2",
        net_options={"dropout": 0.2},
    ),
)
METHODS.register(
    "flat-ff",
    Method(flat, "meanfield", 1e-3, 100, "flat prior, fully factorised Normal posterior", lr_units="weight"),
)
METHODS.register(
    "tiered-ff",
    Method(
        tiered,
        "meanfield",
        5e-3,
        100,
        "regularised-horseshoe (tiered) prior, fully factorised posterior (log-normal on scales)",
    ),
)
METHODS.register(
    "bmr-ss",
    Method(
        description="flat-ff pruned by stochastic BMR, spike-and-slab rule", reduction=SpikeAndSlab(), **_BMR
    ),
)
METHODS.register(
    "bmr-th",
    Method(
        description="flat-ff pruned by stochastic BMR, threshold rule (prune iff dF > 0)",
        reduction=Threshold(),
        **_BMR,
    ),
)
METHODS.register(
    "bmr-lss",
    Method(
        description="flat-ff pruned by stochastic BMR, spike-and-slab over each whole layer, never keeping dF > 0",
        reduction=SpikeAndSlab(
            count_pruned=True, max_cutoff=0.0, pruned_vote=False, keep_pruned_posterior=False
        ),
        **_BMR,
    ),
)
METHODS.register(
    "bmr-rhs",
    Method(
        description="flat-ff reduced by a regularised horseshoe fitted to dF (BMR-RHS)",
        reduction=Horseshoe(),
        **_BMR,
    ),
)
_IVON = dict(
    prior=gaussian, guide="ivon", optimizer="ivon", step="ivon", lr=0.1, samples=100, warmup_steps=500
)
METHODS.register(
    "ivon",
    Method(
        description="the plain net trained by IVON (weight decay = the gaussian prior); its posterior",
        **_IVON,
    ),
)
METHODS.register(
    "ivon-bmr",
    Method(
        description="the plain net trained by IVON, pruned by stochastic BMR from IVON's posterior, threshold rule",
        reduction=Threshold(),
        **_IVON,
    ),
)
