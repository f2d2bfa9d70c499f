"""What defines a training run, declared once: :class:`TrainConfig`'s fields, with their defaults, types and help.

``pyrozoo train`` and ``pyrozoo compare`` build their flags from these fields (:func:`run_option_fields`), the
TOML grid reader checks its ``[train]`` table against them, and the Python API uses the dataclass directly.
Short flags that set one entry of an options table (``--tau0`` is ``--prior-option tau0=...``) are declared in
:data:`ALIASES`. What the names mean (and which options the named prior and reduction take) is checked when a
run is bound to its components (:func:`pyrozoo.bind.bind`).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from pyrozoo import data as datasets
from pyrozoo.errors import PyrozooError
from pyrozoo.options import coerce, finite_problem

# What --resume may change: how far the run goes and how it is evaluated, never what it learns (trust_pickle
# says how the --init-from file was opened, which a resumed run does not open again).
RESUMABLE = ("epochs", "eval_every", "eval_batch_size", "data_dir", "device", "trust_pickle")
# What --resume may change with an explicit --override: the learning rate (a diverged run needs it lowered).
OVERRIDABLE = ("lr",)
# Option tables: run option name -> the word used in messages.
TABLES = {"net_options": "net", "prior_options": "prior", "rule_options": "rule", "guide_options": "guide"}


# The concerns a run's options fall into, in the order `pyrozoo train --help` shows them: each part of a run
# reads its own (TrainConfig.section).
SECTIONS = {
    "data": "the data set",
    "model": "the model: net, prior and likelihood",
    "posterior": "the posterior: guide and where it starts",
    "reduction": "the reduction schedule: BMR passes, units and compaction",
    "optimisation": "optimisation: epochs, steps, batches and the optimiser",
    "evaluation": "evaluation",
    "running": "where it runs",
}


def _run_option(
    default, help: str, *, section: str, check: str | None = None, choices: str | None = None, **kw
):
    """A run option: shown on the command line and in grid files, under its ``section`` (of SECTIONS). ``check``
    is "positive" or "non-negative"; ``choices`` names a registry (resolved lazily, as registries import this
    module's users)."""
    assert section in SECTIONS, section
    metadata = {"help": help, "check": check, "choices": choices, "section": section}
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
    data_dir: str | None = _run_option(None, "folder holding the dataset's files", section="data")
    prior: str | None = _run_option(None, "override the method's prior", choices="priors", section="model")
    guide: str | None = _run_option(
        None, "override the method's guide", choices="guides", section="posterior"
    )
    rule: str | None = _run_option(
        None,
        "override the method's BMR reduction, run after every epoch but the last",
        choices="reductions",
        section="reduction",
    )
    epochs: int = _run_option(
        50, "epochs (with --resume: extend the run to this many)", check="positive", section="optimisation"
    )
    steps_per_epoch: int = _run_option(500, "SVI steps per epoch", check="positive", section="optimisation")
    batch_size: int = _run_option(120, "minibatch size", check="positive", section="optimisation")
    lr: float | None = _run_option(
        None, "learning rate (default: the method's)", check="positive", section="optimisation"
    )
    optimizer: str | None = _run_option(
        None, "optimiser (default: the method's, adam)", choices="optimizers", section="optimisation"
    )
    lr_units: str | None = _run_option(
        None,
        "what --lr measures: weight (a step of the weights, each layer's latent locs at lr / its prior scale; "
        "flat-ff's default) or latent (a step of z = w / scale, the reference code's; the other methods' "
        "default)",
        section="optimisation",
    )
    samples: int | None = _run_option(
        None,
        "posterior samples per evaluation (default: the method's, 100; 1 for MAP)",
        check="positive",
        section="evaluation",
    )
    eval_every: int = _run_option(
        1, "evaluate every N epochs (and always after the last)", check="positive", section="evaluation"
    )
    eval_batch_size: int = _run_option(
        2000, "test points per evaluation batch", check="positive", section="evaluation"
    )
    warmup_steps: int | None = _run_option(
        None,
        "SVI steps before the first BMR pass, which then comes after the first epoch past them (default: the "
        "method's, 500 for BMR methods, and then only once the posterior has moved from its start on most "
        "weights; given, it forces the schedule)",
        check="non-negative",
        section="reduction",
    )
    device: str = _run_option("cpu", "cpu, cuda or cuda:N", section="running")
    net_options: dict = _run_option(
        {},
        "a net size or option, repeatable: preset=tiny, depth=2, hidden=(256,256)",
        section="model",
    )
    prior_options: dict = _run_option(
        {},
        "an option of the method's prior, repeatable: tau0=0.01, hidden_scale=0.1",
        section="model",
    )
    rule_options: dict = _run_option(
        {},
        "an option of the method's BMR reduction, repeatable: count_pruned=true, margin=0.5",
        section="reduction",
    )
    guide_options: dict = _run_option(
        {},
        "an option of the guide, repeatable: init_scale=0.05, init_locs={'features.0.precision': 1.5}",
        section="posterior",
    )
    target: str | None = _run_option(
        None,
        "with --data FILE.csv: the target column (the others are features)",
        section="data",
    )
    task: str | None = _run_option(
        None,
        "with --data FILE.csv: regress (a numeric target, the default) or classify (a label column)",
        section="data",
    )
    noise: str = _run_option(
        "prior",
        "regression: the noise precision is a latent with a Gamma(2, 2) prior (prior), a constant (fixed) or a "
        "point estimate fitted by SVI (learned)",
        section="model",
    )
    noise_precision: float = _run_option(
        1.0,
        "regression, --noise fixed or learned: the (initial) noise precision of standardised targets",
        check="positive",
        section="model",
    )
    init_from: str | None = _run_option(
        None,
        "start from a trained net: a file holding its state_dict, or a net saved whole (pyrozoo export's "
        "sparse_net.pt, when no unit was removed; with --trust-pickle); the posterior means start at its weights, "
        "each scale at its weight's diagonal Laplace scale on the data (--guide-option init_scale=S: every scale S)",
        section="posterior",
    )
    trust_pickle: bool = _run_option(
        False,
        "with --init-from: open a net saved whole (torch.save(net, path)) by unpickling it, which runs any code "
        "the file holds; only for a file you made or trust (a state_dict never needs it)",
        section="posterior",
    )
    start: str | None = _run_option(
        None,
        "where the posterior starts: net (its means at the net's own torch initialisation, so activations have "
        "torch's scale; every net's default but lenet, mlp, vit and mixer) or guide (the guide's random start, "
        "the paper's; theirs, and any net's where --guide-option init_locs or init_radius places the locs); "
        "--init-from starts from trained weights instead",
        section="posterior",
    )
    prune_units: bool = _run_option(
        False,
        "BMR methods: after each per-weight pass, remove whole units (neurons, channels, attention heads) "
        "whose removal raises the evidence",
        section="reduction",
    )
    compact: bool = _run_option(
        True,
        "BMR methods: after each pass, cut the units it killed out of the net, the posterior and the optimiser "
        "state, so that training gets cheaper (the function and the surviving state stay exactly as they were); "
        "--no-compact keeps the full shapes",
        section="reduction",
    )

    def section(self, name: str) -> dict:
        """The options of one concern (a key of SECTIONS), by name: what that part of a run reads."""
        if name not in SECTIONS:
            raise PyrozooError(f"unknown section {name!r}; sections: {', '.join(SECTIONS)}")
        return {f.name: getattr(self, f.name) for f in run_option_fields() if f.metadata["section"] == name}

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
        # before lr_units existed every run's lr was a step of the latents z
        stored.setdefault("lr_units", "latent")
        unknown = sorted(set(stored) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise PyrozooError(f"unknown config keys {unknown}")
        hints = typing.get_type_hints(cls)
        return cls(**{key: coerce(f"config key {key}", hints[key], value) for key, value in stored.items()})


def run_name(net: str, method: str, data: str | None, seed: int) -> str:
    """The folder name of one run, in ``runs/`` for ``pyrozoo train`` and in a grid folder for ``compare``."""
    if datasets.is_table(data):  # a path: its file name without the suffix
        data = Path(data).stem
    return f"{net}-{method}-{data or 'default'}-s{seed}"


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
