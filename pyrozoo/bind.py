"""A run's options bound to the components they name, once: :func:`bind` checks a :class:`TrainConfig` against
the registries (methods, nets, priors, reductions, guides, optimisers, training steps) and keeps what it bound in
a :class:`Bound`, which the builder (:mod:`pyrozoo.build`) and the loop's callbacks use as they are.

The config itself (:mod:`pyrozoo.config`) only declares the options; what a name means is looked up here.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

from pyrozoo import data as datasets
from pyrozoo.bmr.reduction import REDUCTIONS, Reduction, configure
from pyrozoo.bmr.unit_reduction import UnitReduction
from pyrozoo.config import TABLES, TrainConfig, check_value, fold_aliases, option_as_given, run_option_fields
from pyrozoo.distributed import check_device
from pyrozoo.errors import PyrozooError, did_you_mean
from pyrozoo.guides import GUIDES
from pyrozoo.lr_units import check_guide, check_units, has_weight_units
from pyrozoo.methods import METHODS, Method
from pyrozoo.models.priors import PRIORS
from pyrozoo.nets import DATA_SHAPE, NETS, STARTS, net_options
from pyrozoo.optim import OPTIMIZERS
from pyrozoo.options import bind_options
from pyrozoo.registry import option_defaults
from pyrozoo.steps import STEPS, TrainingStep


@dataclass(frozen=True)
class Bound:
    """A run's components, bound once from its config (:func:`bind`)."""

    config: TrainConfig  # with the method's defaults filled in (guide, lr, optimizer, samples, start)
    method: Method
    prior: Callable  # the prior function, this run's prior options bound
    reduction: Reduction | None  # the BMR reduction after each epoch but the last, None for no pruning
    guide_options: dict  # the guide's options, checked and converted
    step: TrainingStep  # how it trains: SVI, or IVON

    def first_pass_step(self) -> int:
        """The warm-up steps before the first BMR pass: ``warmup_steps`` where given (the user's schedule, which
        it forces), else the method's, after which BMR also waits for an informative posterior
        (:class:`pyrozoo.schedule.BMRSchedule`); ``warmup_steps`` stays None in the resolved config to say so.
        """
        c = self.config
        return self.method.warmup_steps if c.warmup_steps is None else c.warmup_steps

    def bmr_passes(self) -> int:
        """How many BMR passes the schedule holds at most: after every epoch but the last, once past the warm-up
        (fewer when BMR waits for an informative posterior)."""
        if self.reduction is None:
            return 0
        c = self.config
        return sum(e * c.steps_per_epoch >= self.first_pass_step() for e in range(1, c.epochs))


def bind(config: TrainConfig) -> Bound:
    """``config``'s components, after checking names, sizes and options; the resolved config has the method's
    defaults filled in, but ``warmup_steps`` stays None (the method's warm-up and then a wait)."""
    method = METHODS[config.method]
    _check_names(config)
    guide = config.guide or method.guide
    guide_options = bind_options(f"guide {guide!r}", GUIDES[guide], config.guide_options)
    for table in ("prior_options", "rule_options"):
        _check_table(config, table)
    optimizer = config.optimizer or method.optimizer
    check_step(method.step, guide, optimizer)
    reduction = _reduction(config)
    if reduction is not None and GUIDES[guide].point_mass:
        raise PyrozooError(
            f"BMR needs a posterior with spread; guide {guide!r} is a point mass: "
            "choose a guide such as meanfield, or a method that does not prune"
        )
    if reduction is None and config.prune_units:
        raise PyrozooError(
            f"--prune-units belongs to the BMR methods ({', '.join(bmr_methods())}); {config.method} prunes "
            "nothing while it trains"
        )
    prior = prior_function(config)
    prior_options = bind_options(f"the prior of {config.method}", prior, config.prior_options)
    resolved = dataclasses.replace(
        config,
        guide=guide,
        lr=config.lr or method.lr,
        optimizer=optimizer,
        lr_units=_lr_units(config, method, guide),
        samples=config.samples or method.samples,
        start=_start(config),
    )
    bound_prior = functools.partial(prior, **prior_options) if prior_options else prior
    return Bound(resolved, method, bound_prior, reduction, guide_options, STEPS[method.step])


def _lr_units(config: TrainConfig, method, guide: str) -> str:
    """What the run's lr measures: ``--lr-units``, else the method's; a method's weight units fall back to
    latent ones under a guide that cannot take them (``--guide ivon``), where asking for them is an error."""
    if config.lr_units is not None:
        if config.lr_units == "weight":
            check_guide(GUIDES[guide], guide)
        return config.lr_units
    return method.lr_units if has_weight_units(GUIDES[guide]) else "latent"


# guide options that place the guide's locs themselves (init_locs: another run's initial draw, as the runs that
# track the reference code from its draw take it): the guide's own start keeps them, the net's would replace them
OWN_LOCS = ("init_locs", "init_radius")


def _start(config: TrainConfig) -> str:
    """Where the posterior starts: ``--start``; else the guide's own start where a guide option places its locs,
    else the net's default (:class:`pyrozoo.nets.registry.NetEntry`)."""
    own = [key for key in OWN_LOCS if key in config.guide_options]
    if own and config.start == "net":
        raise PyrozooError(
            f"--guide-option {own[0]} places the guide's locs, and --start net would replace them by the net's "
            "initialisation: pass --start guide (or leave --start out), or drop the option"
        )
    return config.start or ("guide" if own else NETS[config.net].start)


def _check_names(c: TrainConfig) -> None:
    """The registry names, the data, the devices and the values of ``c``, each a PyrozooError if wrong."""
    NETS[c.net]
    fixed = [key for key in DATA_SHAPE if key in c.net_options]
    if fixed:
        raise PyrozooError(f"net option {', '.join(fixed)}: the data decides it, not a net option")
    if c.data is not None and not datasets.is_table(c.data):
        datasets.DATASETS[c.data]
    datasets.dataset_task(c.data, c.task)
    if (c.target is not None or c.task is not None) and not datasets.is_table(c.data):
        raise PyrozooError("--target and --task describe a --data FILE.csv table")
    if c.start is not None and c.start not in STARTS:
        raise PyrozooError(f"unknown --start {c.start!r}; choose from {', '.join(STARTS)}")
    if c.lr_units is not None:
        check_units(c.lr_units)
    if c.noise not in ("prior", "fixed", "learned"):
        raise PyrozooError(f"unknown --noise {c.noise!r}; choose from prior, fixed, learned")
    for f in run_option_fields():
        check_value(f, getattr(c, f.name))
    if c.optimizer is not None:
        OPTIMIZERS[c.optimizer]
    if not 0 <= c.seed < 2**32:  # pyro.set_rng_seed seeds numpy too, which takes only this range
        raise PyrozooError(f"seed must be in 0..{2**32 - 1}, got {c.seed}")
    check_device(c.device)
    if c.prior is not None:
        PRIORS[c.prior]
    if c.rule is not None:
        REDUCTIONS[c.rule]


def _check_table(c: TrainConfig, table: str) -> None:
    """Every key of ``c``'s prior or rule options is one its prior or reduction takes."""
    taken = options_taken(table, c.method, c.prior, c.rule) or []
    for key in getattr(c, table):
        if key in taken:
            continue
        whose = f" (whose {TABLES[table]} options are: {', '.join(taken)})" if taken else ""
        if did_you_mean(key, taken):  # a misspelling of one of its own options
            raise PyrozooError(
                f"this run's {_part(c, table)} takes no {option_as_given(table, key)}{did_you_mean(key, taken)}{whose}"
            )
        raise PyrozooError(
            f"{option_as_given(table, key)} belongs to {option_takers(table, key)}, "
            f"not to this run's {_part(c, table)}{whose}"
        )


def _part(c: TrainConfig, table: str) -> str:
    """This run's prior or reduction, for messages: ``flat prior (of flat-ff)``."""
    if table == "prior_options":
        return f"{prior_function(c).__name__} prior" + ("" if c.prior else f" (of {c.method})")
    if c.rule:
        return f"reduction, {c.rule}"
    reduction = METHODS[c.method].reduction
    return f"reduction, {'none' if reduction is None else reduction.name} (of {c.method})"


def prior_function(c: TrainConfig) -> Callable:
    """The prior function: the method's, or the one named by ``prior``."""
    return PRIORS[c.prior] if c.prior else METHODS[c.method].prior


def _reduction(c: TrainConfig) -> Reduction | None:
    """The BMR reduction run after each epoch: the method's, with this run's rule options (and a units pass
    after it with ``prune_units``); None for a method that does not prune while training."""
    reduction = REDUCTIONS[c.rule]() if c.rule else METHODS[c.method].reduction
    if reduction is None:
        return None
    reduction = configure(reduction, c.rule_options)
    return reduction.then(UnitReduction()) if c.prune_units else reduction


def bmr_methods() -> list[str]:
    return [name for name, m in METHODS.items() if m.reduction is not None]


def check_step(step: str, guide: str, optimizer: str) -> None:
    """A PyrozooError unless training ``step`` can use ``guide`` and ``optimizer``: a step that owns a guide or an
    optimiser (IVON's posterior is its optimiser's state) takes only those, and no other step takes them."""
    own = STEPS[step]
    for kind, chosen, wanted in (("guide", guide, own.guide), ("optimizer", optimizer, own.optimizer_name)):
        if wanted is not None and chosen != wanted:
            raise PyrozooError(
                f"this method trains by {step}, which needs the {kind} {wanted!r}, not {chosen!r}"
            )
        owners = [
            name
            for name, other in STEPS.items()
            if chosen in (other.guide, other.optimizer_name) and name != step
        ]
        if wanted is None and owners:
            raise PyrozooError(
                f"the {kind} {chosen!r} is trained only by {owners[0]} (methods "
                f"{', '.join(m for m, x in METHODS.items() if x.step == owners[0])}), not by {step}"
            )


def option_takers(table: str, key: str) -> str:
    """What takes a prior or rule option, for messages: ``the tiered prior (tiered-ff)``."""
    methods = [name for name in METHODS if key in (options_taken(table, name) or [])]
    if not methods:
        return f"no {TABLES[table]} of any method"
    part_of = {
        "prior_options": lambda method: method.prior.__name__,
        "rule_options": lambda method: method.reduction.name,
        "guide_options": lambda method: method.guide,
    }[table]
    parts = dict.fromkeys(part_of(METHODS[name]) for name in methods)
    word = {"prior_options": "prior", "rule_options": "reduction", "guide_options": "guide"}[table]
    return f"the {' and '.join(parts)} {word}{'s' if len(parts) > 1 else ''} ({', '.join(methods)})"


def options_taken(
    table: str, method: str, prior: str | None = None, rule: str | None = None, guide: str | None = None
) -> list[str] | None:
    """The options that the prior, the reduction or the guide of a run declares (None: it has no reduction):
    the method's, or those named by ``prior``, ``rule`` and ``guide``. Net options are the net's, not listed.
    """
    m = METHODS[method]
    if table == "guide_options":
        return list(option_defaults(GUIDES[guide or m.guide]))
    if table == "prior_options":
        return list(option_defaults(PRIORS[prior] if prior else m.prior))
    if table == "rule_options":
        reduction = REDUCTIONS[rule] if rule else (None if m.reduction is None else type(m.reduction))
        return None if reduction is None else list(option_defaults(reduction))
    raise ValueError(table)


def make_config(
    net: str, method: str, data: str | None, seed: int, options: dict, strict: bool = True
) -> TrainConfig:
    """The run of ``net`` x ``method`` on ``data`` with ``seed`` under run ``options`` (aliases allowed).

    With ``strict`` an option that ``method`` does not take is an error (as for ``pyrozoo train``); otherwise
    it is left out of this run, as in a grid of several methods (the grid checks that some method takes it).
    """
    options = fold_aliases(options)
    if not strict:
        prior, rule, guide = options.get("prior"), options.get("rule"), options.get("guide")
        for table in ("prior_options", "rule_options", "guide_options"):
            taken = options_taken(table, method, prior, rule, guide) or []
            options[table] = {k: v for k, v in options.get(table, {}).items() if k in taken}
        if options_taken("rule_options", method, prior, rule) is None:
            options["prune_units"] = False
        options["net_options"] = {
            k: v for k, v in options.get("net_options", {}).items() if k in net_options(net)
        }
    return TrainConfig(net=net, method=method, data=data, seed=seed, **options)
