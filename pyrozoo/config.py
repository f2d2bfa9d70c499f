"""What defines a training run, declared once: :class:`TrainConfig`'s fields, with their defaults, types and help.

``pyrozoo train`` and ``pyrozoo compare`` build their flags from these fields (:func:`run_option_fields`), the
TOML grid reader checks its ``[train]`` table against them, and the Python API uses the dataclass directly.
Short flags that set one entry of an options table (``--tau0`` is ``--prior-option tau0=...``) are declared in
:data:`ALIASES`. Prior and reduction options are checked against what the method's prior and reduction declare.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pyrozoo import data as datasets
from pyrozoo.errors import PyrozooError, did_you_mean
from pyrozoo.options import bind_options, coerce, finite_problem
from pyrozoo.registry import option_defaults

# What --resume may change: how far the run goes and how it is evaluated, never what it learns (trust_pickle
# says how the --init-from file was opened, which a resumed run does not open again).
RESUMABLE = ("epochs", "eval_every", "eval_batch_size", "data_dir", "device", "trust_pickle")
# What --resume may change with an explicit --override: the learning rate (a diverged run needs it lowered).
OVERRIDABLE = ("lr",)
# Option tables: run option name -> the word used in messages.
TABLES = {"net_options": "net", "prior_options": "prior", "rule_options": "rule", "guide_options": "guide"}


def _run_option(default, help: str, *, check: str | None = None, choices: str | None = None, **kw):
    """A run option: shown on the command line and in grid files. ``check`` is "positive" or "non-negative";
    ``choices`` names a registry (resolved lazily, as registries import this module's users)."""
    metadata = {"help": help, "check": check, "choices": choices}
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class TrainConfig:
    """Everything that defines a run; ``None`` means the method's or dataset's default."""

    net: str = "lenet"
    data: str | None = None  # None: full Fashion-MNIST if it can be had, else the bundled subset
    method: str = "flat-ff"
    seed: int = 0
    data_dir: str | None = _run_option(None, "folder holding the dataset's files")
    prior: str | None = _run_option(None, "override the method's prior", choices="priors")
    guide: str | None = _run_option(None, "override the method's guide", choices="guides")
    rule: str | None = _run_option(
        None, "override the method's BMR reduction, run after every epoch but the last", choices="reductions"
    )
    epochs: int = _run_option(50, "epochs (with --resume: extend the run to this many)", check="positive")
    steps_per_epoch: int = _run_option(500, "SVI steps per epoch", check="positive")
    batch_size: int = _run_option(120, "minibatch size", check="positive")
    lr: float | None = _run_option(None, "learning rate (default: the method's)", check="positive")
    optimizer: str | None = _run_option(None, "optimiser (default: the method's, adam)", choices="optimizers")
    samples: int | None = _run_option(
        None, "posterior samples per evaluation (default: the method's, 100; 1 for MAP)", check="positive"
    )
    eval_every: int = _run_option(1, "evaluate every N epochs (and always after the last)", check="positive")
    eval_batch_size: int = _run_option(2000, "test points per evaluation batch", check="positive")
    warmup_steps: int | None = _run_option(
        None,
        "SVI steps before the first BMR pass, which then comes after the first epoch past them (default: the "
        "method's, 500 for BMR methods, and then only once the posterior has moved from its start on most "
        "weights; given, it forces the schedule)",
        check="non-negative",
    )
    device: str = _run_option("cpu", "cpu, cuda or cuda:N")
    net_options: dict = _run_option(
        {}, "a net size or option, repeatable: preset=tiny, depth=2, hidden=(256,256)"
    )
    prior_options: dict = _run_option(
        {}, "an option of the method's prior, repeatable: tau0=0.01, hidden_scale=0.1"
    )
    rule_options: dict = _run_option(
        {}, "an option of the method's BMR reduction, repeatable: count_pruned=true, margin=0.5"
    )
    guide_options: dict = _run_option(
        {}, "an option of the guide, repeatable: init_scale=0.05, init_locs={'features.0.precision': 1.5}"
    )
    target: str | None = _run_option(
        None, "with --data FILE.csv: the target column (the others are features)"
    )
    task: str | None = _run_option(
        None, "with --data FILE.csv: regress (a numeric target, the default) or classify (a label column)"
    )
    noise: str = _run_option(
        "prior",
        "regression: the noise precision is a latent with a Gamma(2, 2) prior (prior), a constant (fixed) or a "
        "point estimate fitted by SVI (learned)",
    )
    noise_precision: float = _run_option(
        1.0,
        "regression, --noise fixed or learned: the (initial) noise precision of standardised targets",
        check="positive",
    )
    init_from: str | None = _run_option(
        None,
        "start from a trained net: a file holding its state_dict, or a net saved whole (pyrozoo export's "
        "sparse_net.pt, when no unit was removed; with --trust-pickle); the posterior means start at its weights, "
        "the scales small",
    )
    trust_pickle: bool = _run_option(
        False,
        "with --init-from: open a net saved whole (torch.save(net, path)) by unpickling it, which runs any code "
        "the file holds; only for a file you made or trust (a state_dict never needs it)",
    )
    start: str | None = _run_option(
        None,
        "where the posterior starts: net (its means at the net's own torch initialisation, so activations have "
        "torch's scale; every net's default but lenet, mlp, vit and mixer) or guide (the guide's random start, "
        "the paper's; theirs); --init-from starts from trained weights instead",
    )
    prune_units: bool = _run_option(
        False,
        "BMR methods: after each per-weight pass, remove whole units (neurons, channels, attention heads) "
        "whose removal raises the evidence",
    )
    compact: bool = _run_option(
        True,
        "BMR methods: after each pass, cut the units it killed out of the net, the posterior and the optimiser "
        "state, so that training gets cheaper (the function and the surviving state stay exactly as they were); "
        "--no-compact keeps the full shapes",
    )

    @classmethod
    def from_record(cls, stored: dict) -> "TrainConfig":
        """A config as stored in a run folder's config.json, older layouts included."""
        stored = dict(stored)
        rule_options = dict(stored.get("rule_options") or {})
        if "units" in rule_options:  # before reductions were objects, the structured pass was a rule option
            stored["prune_units"] = bool(rule_options.pop("units"))
            stored["rule_options"] = rule_options
        if "connected" in rule_options:  # before every reduction took allow_empty, sparsity's own switch
            rule_options["allow_empty"] = not rule_options.pop("connected")
            stored["rule_options"] = rule_options
        unknown = sorted(set(stored) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise PyrozooError(f"unknown config keys {unknown}")
        hints = typing.get_type_hints(cls)
        return cls(**{key: coerce(f"config key {key}", hints[key], value) for key, value in stored.items()})

    def resolved(self) -> "TrainConfig":
        """A copy with the method's defaults filled in, after checking names, sizes and options; but
        ``warmup_steps`` stays None, the method's warm-up and then a wait (:meth:`first_pass_step`)."""
        from pyrozoo.bmr.reduction import REDUCTIONS
        from pyrozoo.guides import GUIDES
        from pyrozoo.methods import METHODS
        from pyrozoo.models.priors import PRIORS
        from pyrozoo.nets import DATA_SHAPE, NETS, STARTS
        from pyrozoo.optim import OPTIMIZERS

        method = METHODS[self.method]
        NETS[self.net]
        fixed = [key for key in DATA_SHAPE if key in self.net_options]
        if fixed:
            raise PyrozooError(f"net option {', '.join(fixed)}: the data decides it, not a net option")
        if self.data is not None and not datasets.is_table(self.data):
            datasets.DATASETS[self.data]
        datasets.dataset_task(self.data, self.task)
        if (self.target is not None or self.task is not None) and not datasets.is_table(self.data):
            raise PyrozooError("--target and --task describe a --data FILE.csv table")
        if self.start is not None and self.start not in STARTS:
            raise PyrozooError(f"unknown --start {self.start!r}; choose from {', '.join(STARTS)}")
        if self.noise not in ("prior", "fixed", "learned"):
            raise PyrozooError(f"unknown --noise {self.noise!r}; choose from prior, fixed, learned")
        for f in run_option_fields():
            check_value(f, getattr(self, f.name))
        if self.optimizer is not None:
            OPTIMIZERS[self.optimizer]
        if not 0 <= self.seed < 2**32:  # pyro.set_rng_seed seeds numpy too, which takes only this range
            raise PyrozooError(f"seed must be in 0..{2**32 - 1}, got {self.seed}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise PyrozooError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N") from None
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise PyrozooError("--device cuda was asked for, but torch sees no CUDA device")
        if self.prior is not None:
            PRIORS[self.prior]
        if self.rule is not None:
            REDUCTIONS[self.rule]
        bind_options(
            f"guide {self.guide or method.guide!r}", GUIDES[self.guide or method.guide], self.guide_options
        )
        for table in ("prior_options", "rule_options"):
            taken = options_taken(table, self.method, self.prior, self.rule) or []
            for key in getattr(self, table):
                if key not in taken:
                    whose = f" (whose {TABLES[table]} options are: {', '.join(taken)})" if taken else ""
                    if did_you_mean(key, taken):  # a misspelling of one of its own options
                        raise PyrozooError(
                            f"this run's {self._part(table)} takes no {option_as_given(table, key)}"
                            f"{did_you_mean(key, taken)}{whose}"
                        )
                    raise PyrozooError(
                        f"{option_as_given(table, key)} belongs to {option_takers(table, key)}, "
                        f"not to this run's {self._part(table)}{whose}"
                    )
        from pyrozoo.steps import check_step

        check_step(method.step, self.guide or method.guide, self.optimizer or method.optimizer)
        guide = GUIDES[self.guide or method.guide]
        if self.reduction() is not None and guide.point_mass:
            raise PyrozooError(
                f"BMR needs a posterior with spread; guide {self.guide or method.guide!r} is a point mass: "
                "choose a guide such as meanfield, or a method that does not prune"
            )
        if self.reduction() is None and self.prune_units:
            raise PyrozooError(
                f"--prune-units belongs to the BMR methods ({', '.join(bmr_methods())}); {self.method} prunes "
                "nothing while it trains"
            )
        bind_options(f"the prior of {self.method}", self.prior_function(), self.prior_options)  # value types
        self.reduction()
        return dataclasses.replace(
            self,
            guide=self.guide or method.guide,
            lr=self.lr or method.lr,
            optimizer=self.optimizer or method.optimizer,
            samples=self.samples or method.samples,
            start=self.start or NETS[self.net].start,
        )

    def _part(self, table: str) -> str:
        """This run's prior or reduction, for messages: ``flat prior (of flat-ff)``."""
        from pyrozoo.methods import METHODS

        if table == "prior_options":
            return f"{self.prior_function().__name__} prior" + ("" if self.prior else f" (of {self.method})")
        if self.rule:
            return f"reduction, {self.rule}"
        reduction = METHODS[self.method].reduction
        return f"reduction, {'none' if reduction is None else reduction.name} (of {self.method})"

    def prior_function(self):
        """The prior function: the method's, or the one named by ``prior``."""
        from pyrozoo.methods import METHODS
        from pyrozoo.models.priors import PRIORS

        return PRIORS[self.prior] if self.prior else METHODS[self.method].prior

    def bound_prior(self):
        """The prior function with this run's prior options bound."""
        prior = self.prior_function()
        return functools.partial(prior, **self.prior_options) if self.prior_options else prior

    def reduction(self):
        """The BMR reduction run after each epoch: the method's, with this run's rule options (and a units pass
        after it with ``prune_units``); None for a method that does not prune while training."""
        from pyrozoo.bmr.reduction import REDUCTIONS, configure
        from pyrozoo.bmr.unit_reduction import UnitReduction
        from pyrozoo.methods import METHODS

        reduction = REDUCTIONS[self.rule]() if self.rule else METHODS[self.method].reduction
        if reduction is None:
            return None
        reduction = configure(reduction, self.rule_options)
        return reduction.then(UnitReduction()) if self.prune_units else reduction

    def first_pass_step(self) -> int:
        """The warm-up steps before the first BMR pass: ``warmup_steps`` where given (the user's schedule, which
        it forces), else the method's, after which BMR also waits for an informative posterior (see
        ``Run._bmr_pass``); ``warmup_steps`` stays None in the resolved config to say so."""
        from pyrozoo.methods import METHODS

        return METHODS[self.method].warmup_steps if self.warmup_steps is None else self.warmup_steps

    def bmr_passes(self) -> int:
        """How many BMR passes the schedule holds at most: after every epoch but the last, once past the warm-up
        (fewer when BMR waits for an informative posterior)."""
        if self.reduction() is None:
            return 0
        return sum(e * self.steps_per_epoch >= self.first_pass_step() for e in range(1, self.epochs))


def run_name(net: str, method: str, data: str | None, seed: int) -> str:
    """The folder name of one run, in ``runs/`` for ``pyrozoo train`` and in a grid folder for ``compare``."""
    if datasets.is_table(data):  # a path: its file name without the suffix
        data = Path(data).stem
    return f"{net}-{method}-{data or 'default'}-s{seed}"


def bmr_methods() -> list[str]:
    from pyrozoo.methods import METHODS

    return [name for name, m in METHODS.items() if m.reduction is not None]


def run_option_fields() -> list[dataclasses.Field]:
    """The run options: every field of TrainConfig but the grid's axes (net, data, method, seed)."""
    return [f for f in dataclasses.fields(TrainConfig) if "help" in f.metadata]


def check_value(f: dataclasses.Field, value) -> None:
    """A run option's value against its declared check (sign, finiteness)."""
    if value is None or isinstance(value, (bool, dict, str)):
        return
    flag = "--" + f.name.replace("_", "-")
    if isinstance(value, float) and finite_problem(value):
        raise PyrozooError(f"{flag} {finite_problem(value)}")
    check = f.metadata.get("check")
    if check == "positive" and not value > 0:
        raise PyrozooError(f"{flag} must be positive, got {value}")
    if check == "non-negative" and not value >= 0:
        raise PyrozooError(f"{flag} must not be negative, got {value}")


@dataclass(frozen=True)
class Alias:
    """A short flag for one entry of an options table: ``--tau0 X`` is ``--prior-option tau0=X``."""

    table: str  # a key of TABLES
    key: str
    kind: type  # float, or bool for a switch
    help: str


ALIASES = {
    "dropout": Alias("net_options", "dropout", float, "dropout after hidden layers (net option dropout)"),
    "hidden_scale": Alias(
        "prior_options",
        "hidden_scale",
        float,
        "flat prior: hidden layers' scale relative to the output layer's",
    ),
    "tau0": Alias("prior_options", "tau0", float, "tiered prior: global scale (prior option tau0)"),
    "local_scales": Alias(
        "prior_options", "local", bool, "tiered prior: per-weight local scales (option local)"
    ),
    "count_pruned": Alias(
        "rule_options",
        "count_pruned",
        bool,
        "spike-and-slab: count pruned weights as excluded (option count_pruned)",
    ),
}


def as_stored(value):
    """``value`` as config.json holds it (tuples as lists): run options are compared in this form, so that a
    spelling (``(32, 32)`` on the command line, ``[32, 32]`` read back) is never taken for a change."""
    return json.loads(json.dumps(value))


def fold_aliases(options: dict) -> dict:
    """Run options with alias keys (``tau0``) moved into their tables (``prior_options["tau0"]``); an alias and
    its table entry given both, with different values, is an error."""
    options = {k: (dict(v) if k in TABLES else v) for k, v in options.items()}
    for name, alias in ALIASES.items():
        if name not in options:
            continue
        value = options.pop(name)
        if alias.kind is bool and value is False:
            continue  # a switch that is off sets nothing
        table = options.setdefault(alias.table, {})
        if alias.key in table and table[alias.key] != value:
            raise PyrozooError(
                f"--{name.replace('_', '-')} and {TABLES[alias.table]} option {alias.key} disagree"
            )
        table[alias.key] = value
    return options


def option_as_given(table: str, key: str) -> str:
    """How a user gives a table's option: its short flag if it has one (``--tau0``), else ``prior option tau0``."""
    for name, alias in ALIASES.items():
        if (alias.table, alias.key) == (table, key):
            return "--" + name.replace("_", "-")
    return f"{TABLES[table]} option {key!r}"


def option_takers(table: str, key: str) -> str:
    """What takes a prior or rule option, for messages: ``the tiered prior (tiered-ff)``."""
    from pyrozoo.methods import METHODS

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
    from pyrozoo.bmr.reduction import REDUCTIONS
    from pyrozoo.guides import GUIDES
    from pyrozoo.methods import METHODS
    from pyrozoo.models.priors import PRIORS

    m = METHODS[method]
    if table == "guide_options":
        return list(option_defaults(GUIDES[guide or m.guide]))
    if table == "prior_options":
        return list(option_defaults(PRIORS[prior] if prior else m.prior))
    if table == "rule_options":
        reduction = REDUCTIONS[rule] if rule else (None if m.reduction is None else type(m.reduction))
        return None if reduction is None else list(option_defaults(reduction))
    raise ValueError(table)


def check_run_options(options: dict, where: str) -> dict:
    """Run options (field and alias names) from a grid file or a caller, checked for names and types; ints
    given for float options become floats."""
    fields = {f.name: f for f in run_option_fields()}
    hints = typing.get_type_hints(TrainConfig)
    checked = {}
    for key, value in options.items():
        if key in fields:
            kind = hints[key]
        elif key in ALIASES:
            kind = ALIASES[key].kind
        else:
            known = ", ".join([*fields, *ALIASES])
            raise PyrozooError(f"{where}: unknown run option {key!r}; known: {known}")
        value = coerce(f"{where}: {key}", kind, value)
        if key in fields:
            check_value(fields[key], value)
        checked[key] = value
    return checked


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
        from pyrozoo.nets import net_options

        options["net_options"] = {
            k: v for k, v in options.get("net_options", {}).items() if k in net_options(net)
        }
    return TrainConfig(net=net, method=method, data=data, seed=seed, **options)
