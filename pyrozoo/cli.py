"""The ``pyrozoo`` command: ``train``, ``compare``, ``plot``, ``prune``, ``sweep``, ``export``, ``predict``,
``uncertainty`` and ``info``.

Run options are not declared here: the flags of ``train`` and ``compare`` are built from
:class:`pyrozoo.config.TrainConfig`'s fields and :data:`pyrozoo.config.ALIASES`, and every name a flag takes is
checked against its registry.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import shlex
import shutil
import sys
import textwrap
import time
import traceback
from pathlib import Path

from pyrozoo import data as datasets
from pyrozoo.baselines import BASELINES, LR_SCHEDULES
from pyrozoo.bmr import REDUCTIONS
from pyrozoo.config import ALIASES, SECTIONS, TABLES, TrainConfig, run_name, run_option_fields
from pyrozoo.errors import PyrozooError, did_you_mean
from pyrozoo.guides import GUIDES
from pyrozoo.io import atomic_write, atomic_write_text
from pyrozoo.methods import METHODS
from pyrozoo.models.likelihoods import LIKELIHOODS
from pyrozoo.models.priors import PRIORS
from pyrozoo.nets import NETS, PREFIXES, net_options
from pyrozoo.optim import OPTIMIZERS
from pyrozoo.options import finite_problem, parse_option
from pyrozoo.posteriors import OWN, POSTERIORS, FittedSource, make_source
from pyrozoo.pruners import PRUNERS
from pyrozoo.registry import describe, option_names
from pyrozoo.shift import SHIFTS
from pyrozoo.sweep import bmr_methods
from pyrozoo.sweep import methods as sweep_methods

SUMMARY_COLUMNS = [
    "epoch",
    "seconds",
    "elbo",
    "accuracy",
    "nll",
    "ece",
    "ece15",
    "brier",
    "lpd",
    "pruned_fraction",
]
# A regression run's summary: its own metrics in place of the classification ones.
REGRESSION_SUMMARY_COLUMNS = ["epoch", "seconds", "elbo", "rmse", "nll", "lpd", "coverage50", "coverage90",
                              "coverage95", "pruned_fraction"]  # fmt: skip
# Exit codes: 0 done, 2 a user's mistake (PyrozooError, one line), 1 a diverged loss (TrainingDiverged), 3 a bug
# (any other exception, with its traceback), 130 interrupted.
BUG_EXIT_CODE = 3
REGISTRIES = {"guides": GUIDES, "optimizers": OPTIMIZERS, "priors": PRIORS, "reductions": REDUCTIONS}


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        # a misspelt flag that happens to be a prefix (--epoch for --epochs) is an error, never a guess
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message):  # one line and exit code 2, as for every other user error
        # main prints "pyrozoo: error:" before it: name the subcommand only ("train: ...")
        where = self.prog.removeprefix("pyrozoo").strip()
        raise PyrozooError(f"{where}: {message}" if where else message)

    def parse_args(self, args=None, namespace=None):
        """As argparse's, with a misspelt flag answered by the subcommand's closest one ("did you mean")."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            sub = next(
                (
                    action.choices[command]
                    for action in self._actions
                    if isinstance(action, argparse._SubParsersAction) and command in action.choices
                ),
                self,
            )
            flags = list(sub._option_string_actions)
            hint = next((did_you_mean(w, flags) for w in extras if w.startswith("--")), "")
            sub.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed


FRACTION = "must be a fraction in [0, 1), e.g. 0.25"


def _number(kind: type, check: str | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            if check == "fraction":  # worded as the range check below words it
                raise argparse.ArgumentTypeError(f"{FRACTION}; got {text!r}") from None
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value):
            sign = f"{check} " if check else ""
            raise argparse.ArgumentTypeError(f"must be a finite {sign}number, got {text!r}")
        if finite_problem(value):
            raise argparse.ArgumentTypeError(finite_problem(value))
        if check == "positive" and not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {value}")
        if check == "non-negative" and not value >= 0:
            raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
        if check == "fraction" and not 0 <= value < 1:
            raise argparse.ArgumentTypeError(f"{FRACTION}; got {value}")
        return value

    return parse


def _choice(known):
    def check(text: str) -> str:
        if text not in known:
            raise argparse.ArgumentTypeError(
                f"unknown name {text!r}{did_you_mean(text, known)}; choose from {', '.join(known)}"
            )
        return text

    return check


def _net_choice(text: str) -> str:
    """A registered net's name, or ``tv:NAME`` / ``timm:NAME``."""
    try:
        return _choice(NETS)(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(
            f"{e}; or tv:NAME / timm:NAME for a torchvision or timm model"
        ) from None


def _data_choice(text: str) -> str:
    """A registered dataset's name, or a CSV table's path."""
    return text if datasets.is_table(text) else _choice(list(datasets.DATASETS))(text)


def _key_value(text: str) -> dict:
    try:
        key, value = parse_option(text)
    except PyrozooError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return {key: value}


class _MergeOptions(argparse.Action):
    """Merges repeated ``KEY=VALUE`` options into one dict."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, {**(current if isinstance(current, dict) else {}), **values})


def _add_key_value(parser, flag: str, dest: str, help: str) -> None:
    parser.add_argument(
        flag,
        dest=dest,
        type=_key_value,
        action=_MergeOptions,
        metavar="KEY=VALUE",
        default=argparse.SUPPRESS,
        help=help + " (values are Python literals or true/false, else strings)",
    )


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of one training run, shared by ``train`` and ``compare``, built from TrainConfig's fields.
    An option that is not given is left out of the parsed arguments, so that the config (or a grid file, or
    the stored run when resuming) supplies it."""
    import typing

    hints = typing.get_type_hints(TrainConfig)
    groups = {name: parser.add_argument_group(f"run options, {text}") for name, text in SECTIONS.items()}
    for f in sorted(run_option_fields(), key=lambda f: list(SECTIONS).index(f.metadata["section"])):
        flag, meta, group = "--" + f.name.replace("_", "-"), f.metadata, groups[f.metadata["section"]]
        if f.name in TABLES:
            _add_key_value(group, f"--{TABLES[f.name]}-option", f.name, meta["help"])
            continue
        kind = next((k for k in typing.get_args(hints[f.name]) if k is not type(None)), hints[f.name])
        shown = not any(f.default is v for v in (None, False, True)) and kind in (
            int,
            float,
            str,
        )  # a number or a word to show
        help = (
            f"{meta['help']} (default {f.default})"
            if shown and "default" not in meta["help"]
            else meta["help"]
        )
        kwargs = {"help": help, "default": argparse.SUPPRESS}
        if kind is bool and f.default is True:  # a switch on by default: --no-<name> turns it off
            group.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", **kwargs)
        elif kind is bool:
            group.add_argument(flag, action="store_true", **kwargs)
        elif meta.get("choices"):
            group.add_argument(flag, type=_choice(list(REGISTRIES[meta["choices"]])), **kwargs)
        elif kind in (int, float):
            group.add_argument(flag, type=_number(kind, meta.get("check")), **kwargs)
        else:
            group.add_argument(flag, **kwargs)
    sections = {f.name: f.metadata["section"] for f in run_option_fields()}
    for name, alias in ALIASES.items():
        flag, group = "--" + name.replace("_", "-"), groups[sections[alias.table]]
        if alias.kind is bool:
            group.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=alias.help)
        else:
            group.add_argument(flag, type=_number(alias.kind), default=argparse.SUPPRESS, help=alias.help)
    _no_progress(parser)


def _fit_size_help() -> str:
    takers = [name for name, source in POSTERIORS.items() if "fit_size" in option_names(source)]
    return (
        f"with a posterior source that takes it ({', '.join(takers)}): estimate the curvature from this many "
        "training inputs drawn at random (default: all)"
    )


def _to_stderr(text: str) -> None:
    """The log of every command: messages on stderr, so stdout holds only results; through tqdm, which clears a
    progress bar on the stream and draws it again below the line (a plain print lands after the bar's text).
    """
    from tqdm.auto import tqdm

    tqdm.write(text, file=sys.stderr)


def _add_pruned_option(parser: argparse.ArgumentParser, verb: str, default: str | None) -> None:
    """--pruned [latest|SOURCE|none], alike on export, predict and uncertainty; only the default differs."""
    fitted = [name for name, source in POSTERIORS.items() if issubclass(source, FittedSource)]
    parser.add_argument(
        "--pruned",
        nargs="?",
        const="latest",
        default=default,
        choices=["latest", *POSTERIORS, "none"],
        help=f"{verb} the state pyrozoo prune --posterior P pruned: P (its file: "
        + ", ".join(f"{name} {make_source(name).file}" for name in POSTERIORS)
        + "), latest (the newest of those, said when there are several; --pruned alone), or none (the "
        + (
            "checkpoint as trained; default: the newest pruned result, else the checkpoint)"
            if default is None
            else f"checkpoint as trained; default {default}). A state loaded into the run's model and guide is "
            f"sampled as the run's posterior; the plain net pruned from a posterior fitted after training "
            f"({', '.join(fitted)}) is one draw, no epistemic part"
        ),
    )


def chosen_pruned(run, which: str | None, log=print):
    """The posterior source whose pruned result ``--pruned which`` names (latest: the newest there is, refused
    when there is none), or None for the checkpoint as trained; ``which`` None: the newest, else the checkpoint
    (export's default)."""
    from pyrozoo.export import pruned_results

    if which in ("latest", None):
        found = pruned_results(run.out)
        if not found and which == "latest":
            raise PyrozooError(f"{run.out} has no pruned result: make one with pyrozoo prune {run.out}")
        which = next(iter(found), "none")
        if len(found) > 1:
            log(
                f"{run.out} has {len(found)} pruned results ({', '.join(p.name for p in found.values())}): "
                f"using the newest, {found[which].name} (choose with --pruned " + "|".join(found) + ")"
            )
    return None if which == "none" else make_source(which)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyrozoo", description="Bayesian sparsification of deep networks with Pyro and BMR."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    quiet = argparse.SUPPRESS

    train = sub.add_parser("train", help="train a Bayesian net by SVI into a run folder")
    train.add_argument(
        "--net", type=_net_choice, default=quiet, help="net (default lenet; or tv:NAME, timm:NAME)"
    )
    train.add_argument(
        "--data",
        type=_data_choice,
        default=quiet,
        help="dataset, or a CSV table FILE.csv (with --target COLUMN) (default: fashion-mnist, or the bundled "
        "fashion-mnist-mini if it is missing)",
    )
    train.add_argument(
        "--method", type=_choice(list(METHODS)), default=quiet, help="method (default flat-ff)"
    )
    _add_run_options(train)
    train.add_argument("--seed", type=int, default=quiet, help="random seed (default 0)")
    train.add_argument("--out", default=None, help="run folder (default: runs/NET-METHOD-DATA-sSEED)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    train.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="OPTION",
        help="with --resume: let OPTION (only lr) change from the run's; config.json records the change",
    )

    compare = sub.add_parser(
        "compare",
        help="train a grid of nets x methods x datasets x seeds into one folder (resumable); tidy results.csv, "
        "a summary table and plots",
    )
    compare.add_argument(
        "--config", help="grid config file (TOML, see experiments/grid-*.toml); flags override it"
    )
    compare.add_argument(
        "--nets", nargs="+", type=_net_choice, default=quiet, help="the grid's nets, in place of its config's"
    )
    compare.add_argument(
        "--methods",
        nargs="+",
        type=_choice([*METHODS, *BASELINES]),
        default=quiet,
        help="training methods, and baselines: magnitude (-ft) prunes the flat-map net by global magnitude to "
        "the sparsity bmr-ss reached (then fine-tunes it), magnitude-layer (-ft) each layer to that fraction",
    )
    compare.add_argument(
        "--data",
        nargs="+",
        type=_data_choice,
        default=quiet,
        help="datasets (default: fashion-mnist)",
    )
    compare.add_argument("--seeds", nargs="+", type=int, default=quiet, help="seeds (default: 0)")
    compare.add_argument(
        "--finetune-steps",
        type=int,
        default=quiet,
        help="magnitude-ft: Adam steps of fine-tuning after pruning, at the flat-map run's lr and batch (500)",
    )
    compare.add_argument("--out", default=quiet, help="grid folder (default: runs/grid)")
    compare.add_argument(
        "--no-plots", action="store_true", help="skip the figures (pyrozoo plot DIR draws them)"
    )
    compare.add_argument(
        "--launcher",
        type=_choice(["local", "slurm"]),
        default="local",
        help="where the cells run: local (on this machine, --jobs at a time) or slurm (one Slurm job per cell, "
        "through submitit)",
    )
    compare.add_argument(
        "--jobs",
        type=_number(int, "positive"),
        default=quiet,
        help="--launcher local: cells run at once, as separate processes sharing this machine's threads (1)",
    )
    _add_key_value(
        compare,
        "--slurm-option",
        "slurm_options",
        "--launcher slurm: a submitit option, repeatable: partition=gpu, timeout_min=600, gpus_per_node=1, "
        "cpus_per_task=8, mem_gb=32, account=..., qos=...; cluster=local tries the jobs on this machine",
    )
    compare.add_argument(
        "--no-wait",
        action="store_true",
        help="--launcher slurm: return once the jobs are submitted (the same command again collects the results)",
    )
    _add_run_options(compare)

    plot = sub.add_parser(
        "plot", help="redraw a grid folder's figures from its results.csv (and run folders)"
    )
    plot.add_argument("grid", help="grid folder written by pyrozoo compare")

    prune = _run_command(
        sub,
        "prune",
        help="one-shot BMR of a finished run, from its own posterior or one fitted after training (writes "
        "RUN/pruned.pt, or RUN/pruned-SOURCE.pt with --posterior SOURCE)",
    )
    prune.add_argument(
        "--rule",
        type=_choice(list(REDUCTIONS)),
        default="threshold",
        help="the reduction (pyrozoo info lists them with their options): threshold (prune iff dF > margin), "
        "spike-and-slab, sparsity (to a target), units (whole neurons, channels and attention heads), "
        "horseshoe (BMR-RHS), shrinkage (rows whose posterior-mean prior scale is below a threshold)",
    )
    _add_key_value(prune, "--rule-option", "rule_options", "an option of the reduction, repeatable")
    prune.add_argument(
        "--margin", type=_number(float), default=quiet, help="short for --rule-option margin=M"
    )
    prune.add_argument(
        "--threshold",
        type=_number(float, "positive"),
        default=quiet,
        help="short for --rule-option threshold=T",
    )
    prune.add_argument(
        "--count-pruned", action="store_true", default=quiet, help="short for --rule-option count_pruned=true"
    )
    prune.add_argument(
        "--posterior",
        type=_choice(list(POSTERIORS)),
        default=OWN,
        help="where BMR's posterior comes from, a posterior source (each writes its file into RUN): "
        + "; ".join(
            f"{name}: {text} (RUN/{make_source(name).file})" for name, text in POSTERIORS.described()
        ),
    )
    _add_key_value(
        prune, "--posterior-option", "posterior_options", "an option of the posterior source, repeatable"
    )
    prune.add_argument("--fit-size", type=_number(int, "positive"), default=None, help=_fit_size_help())
    _no_progress(prune, " (a posterior fit's)")
    prune.add_argument(
        "--sparsity",
        type=_number(float, "non-negative"),
        default=quiet,
        help="prune to this fraction by dF, counting units that die with their weights, never emptying a layer "
        "(the sparsity rule: --rule sparsity --rule-option sparsity=S)",
    )

    sweep = sub.add_parser(
        "sweep",
        help="accuracy-sparsity curve of a trained run: BMR from each posterior source ("
        + ", ".join(POSTERIORS)
        + ") against magnitude and Torch-Pruning channel pruning, one shot (RUN/sweep/)",
    )
    sweep.add_argument("run", help="run folder (a flat-map run, or any finished run)")
    sweep.add_argument(
        "--sparsities",
        nargs="+",
        type=_number(float, "non-negative"),
        default=[0.5, 0.7, 0.8, 0.9, 0.95, 0.98],
        help="target pruned fractions (default 0.5 0.7 0.8 0.9 0.95 0.98)",
    )
    sweep.add_argument(
        "--methods",
        nargs="+",
        type=_choice(sweep_methods()),
        default=quiet,
        help="methods (default: all that apply: BMR from a source that gives the run a posterior with spread): "
        "bmr-SOURCE for each posterior source, "
        + "; ".join(f"{m}: {v.about}" for m, (name, v) in bmr_methods().items() if m != f"bmr-{name}")
        + "; magnitude, magnitude-layer: smallest |w| globally, in each layer; torch-pruning: L1 channel pruning",
    )
    sweep.add_argument(
        "--finetune-steps",
        type=_number(int, "non-negative"),
        default=0,
        help="also fine-tune every pruned net for this many Adam steps (masks kept) at the run's lr and batch",
    )
    sweep.add_argument(
        "--samples",
        type=_number(int, "positive"),
        default=0,
        help="also evaluate each BMR method's reduced posterior (pruned entries 0) by its predictive from this "
        "many draws, as rows of predictive glm (a Laplace posterior's linearised net; --posterior-option "
        "predictive=samples for the net at sampled weights) or samples (a run's own posterior); fine-tuned "
        "nets have no posterior, so their rows stay point estimates",
    )
    sweep.add_argument("--fit-size", type=_number(int, "positive"), default=None, help=_fit_size_help())
    _add_key_value(
        sweep,
        "--posterior-option",
        "posterior_options",
        "an option of the posterior sources that take it, repeatable (predictive: with --samples)",
    )
    sweep.add_argument("--out", default=None, help="folder for sweep.csv and the figure (default RUN/sweep)")
    _no_progress(sweep)

    export = _run_command(
        sub, "export", help="rebuild the run's sparse net, save it, compare it with the dense one"
    )
    _add_pruned_option(export, "export", default=None)
    export.add_argument(
        "--repeats", type=_number(int, "positive"), default=50, help="timed forward passes per latency"
    )

    compress = sub.add_parser(
        "compress",
        help="a trained net in, a smaller and faster one out: whole units removed in the order the evidence "
        "gives, to a target cost, with Torch-Pruning's pruners at the same cost beside it",
    )
    compress.add_argument(
        "net",
        help="the net's architecture: a pyrozoo net (pyrozoo info), tv:NAME, timm:NAME, or package.module:factory "
        "(a function building it, called with those of in_channels, num_classes, image_size it takes)",
    )
    compress.add_argument(
        "--weights",
        required=True,
        help="its trained weights: a state_dict file (torch.save(net.state_dict(), path)), or a net saved whole "
        "(with --trust-pickle)",
    )
    compress.add_argument(
        "--trust-pickle", action="store_true", help="open a net saved whole (runs its code)"
    )
    compress.add_argument(
        "--net-option",
        action="append",
        metavar="KEY=VALUE",
        help="the net's sizes as it was trained, repeatable: hidden=(100,100) (pyrozoo nets, tv/timm models and "
        "factories take their own keyword arguments)",
    )
    compress.add_argument(
        "--data", type=_data_choice, default=None, help="the data it was trained on (default: Fashion-MNIST)"
    )
    compress.add_argument("--data-dir", default=None, help="folder holding the data set's files")
    compress.add_argument(
        "--pad-to",
        type=_number(int, "positive"),
        default=None,
        help="zero-pad images to this size, as the net was trained (default: a pyrozoo net's own; else none)",
    )
    compress.add_argument(
        "--target",
        action="append",
        default=None,
        help="what to reach, repeatable: params=F, flops=F or latency=F (F: the fraction of the dense net's "
        "cost to keep; several as latency=0.7,0.5), or evidence (every unit whose removal raises the evidence; "
        "the default)",
    )
    compress.add_argument(
        "--finetune-steps",
        type=_number(int, "non-negative"),
        default=300,
        help="Adam steps of fine-tuning after pruning, the same for every method (default 300)",
    )
    compress.add_argument(
        "--lr", type=_number(float, "positive"), default=1e-3, help="fine-tune learning rate (default 1e-3)"
    )
    compress.add_argument(
        "--lr-schedule",
        choices=list(LR_SCHEDULES),
        default="cosine",
        help="how the fine-tune's learning rate moves: cosine (decayed to 0 over the steps; the default) or "
        "constant",
    )
    compress.add_argument(
        "--batch-size", type=_number(int, "positive"), default=128, help="fine-tune batch (default 128)"
    )
    compress.add_argument(
        "--fit-size",
        type=_number(int, "positive"),
        default=2000,
        help="training inputs the Laplace curvature is estimated from (default 2000)",
    )
    compress.add_argument(
        "--baselines",
        nargs="*",
        choices=list(PRUNERS),
        default=list(PRUNERS),
        help="the pruners to compare with, at the same cost and fine-tune (default: all; none: give it empty)",
    )
    compress.add_argument(
        "--repeats",
        type=_number(int, "positive"),
        default=7,
        help="timed rounds per latency ratio (default 7; 21 steadies a loaded machine's readings)",
    )
    compress.add_argument(
        "--threads",
        type=_number(int, "positive"),
        default=1,
        help="CPU threads latency is timed on (default 1: read on that thread's CPU clock; more: on the wall "
        "clock); the Laplace fit, the fine-tunes and the test metrics use torch's own count (every core, or "
        "OMP_NUM_THREADS)",
    )
    compress.add_argument(
        "--allocation",
        choices=["auto", "uniform", "global"],
        default="auto",
        help="how many units each layer group loses: uniform (the same fraction of each, --score choosing which), "
        "global (every unit by its --score per unit of the target's cost: per parameter, per FLOP, or for latency "
        "per its share of the dense net's profiled time; each group keeping at least --min-width) or auto (the "
        "default: global for a latency target, uniform otherwise)",
    )
    compress.add_argument(
        "--min-width",
        type=_number(float, "fraction"),
        default=0.25,
        help="with a global allocation (auto's for a latency target), the least fraction of each layer group's "
        "units that stays, rounded up, in [0, 1) (default 0.25); a high floor can leave a target out of reach",
    )
    compress.add_argument(
        "--device",
        default="cpu",
        help="where fine-tuning and the test metrics run: cpu (default), cuda or cuda:N; the Laplace fit, "
        "pruning and latency stay on the CPU",
    )
    compress.add_argument(
        "--score",
        choices=["obd", "evidence"],
        default="obd",
        help="what ranks the units within a group: obd (dF without its Occam term, the default: under --curvature "
        "kfac the fit term of the unit's columns together, Optimal Brain Surgeon's saliency; under diag "
        "-1/2 (h + prior precision) w^2 summed over the unit) or evidence (the whole dF); the evidence target "
        "always uses dF",
    )
    compress.add_argument(
        "--curvature",
        choices=["kfac", "diag"],
        default="kfac",
        help="the Laplace posterior's curvature: kfac (Kronecker-factored, the default: a unit's columns are "
        "scored jointly and the rebuilt net's remaining columns compensate for the removed ones) or diag "
        "(diagonal: each entry on its own, the net rebuilt at the trained weights)",
    )
    compress.add_argument(
        "--calibrate",
        type=_number(int, "non-negative"),
        default=0,
        metavar="N",
        help="hold out N test inputs (drawn by --seed) to fit each net's temperature, folded into its last layer "
        "so the saved net is calibrated; the metrics are then read on the other test inputs (default 0: none)",
    )
    compress.add_argument("--seed", type=_number(int, "non-negative"), default=0, help="random seed (default 0)")
    compress.add_argument("--out", default=None, help="report folder (default compressed/NET)")
    _no_progress(compress)

    predict = _run_command(
        sub,
        "predict",
        help="per-input predictions with their uncertainty (class probabilities, entropy, mutual information; "
        "regression mean, std and intervals) into a CSV",
    )
    source = predict.add_mutually_exclusive_group()
    source.add_argument(
        "--data",
        type=_data_choice,
        default=None,
        help="a dataset or FILE.csv whose test split to predict "
        "(default: the run's own test set); standardised with the run's training statistics",
    )
    source.add_argument(
        "--input",
        default=None,
        help="inputs to predict: a CSV of feature columns (tabular runs), or a .npy/.pt "
        "array of images (N, H, W) or (N, C, H, W) with pixel values 0..255",
    )
    predict.add_argument(
        "--shift", choices=["rotate", "noise"], default=None, help="shift the test images first"
    )
    predict.add_argument("--severity", type=int, default=3, help="shift severity 1..5 (default 3)")
    _add_sampling_options(predict, "predict")
    predict.add_argument("--out", required=True, help="CSV file to write (written atomically)")
    _no_progress(predict)

    uncertainty = sub.add_parser(
        "uncertainty",
        help="accuracy, ECE, NLL and misclassification AUROC of entropy and MI on the clean test set and on "
        "rotated and noisy copies of it, severities 1..5 (writes RUN/uncertainty.csv); with --ood DATASET, "
        "out-of-distribution detection instead, one row per run and baseline (writes ood-DATASET.csv)",
    )
    uncertainty.add_argument(
        "run", nargs="*", help="run folder; with --ood, any number of them, one row each"
    )
    uncertainty.add_argument(
        "--ood",
        default=None,
        metavar="DATASET",
        help="an out-of-distribution set: a dataset's test split (e.g. digits for a Fashion-MNIST run) or a "
        ".npy/.pt file of images; reports the AUROC and AUPR of entropy and of mutual information for telling "
        "it from the test set, beside the test set's accuracy, NLL and ECE",
    )
    uncertainty.add_argument(
        "--mc-dropout",
        type=_number(int, "positive"),
        default=None,
        metavar="N",
        help="with --ood: a row more for each run whose net has dropout: MC dropout, N passes of its "
        "posterior-mean net (a flat-map run's MAP) with dropout kept on",
    )
    uncertainty.add_argument(
        "--ensemble",
        nargs="+",
        action="append",
        default=None,
        metavar="RUN",
        help="with --ood: a row for the deep ensemble of these runs (the mean of their probabilities; its MI "
        "the members' disagreement); repeatable, a row each",
    )
    uncertainty.add_argument(
        "--out",
        default=None,
        help="with --ood: the folder for ood-DATASET.csv and its figure (default: the run's folder, when "
        "the table is of one run)",
    )
    _add_sampling_options(uncertainty, "measure")
    _no_progress(uncertainty)

    sub.add_parser("info", help="list nets, methods, reductions, priors, guides and datasets")
    return parser


def _run_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand that works on one run folder, its first argument."""
    parser = sub.add_parser(name, help=help)
    parser.add_argument("run", help="run folder")
    return parser


def _no_progress(parser: argparse.ArgumentParser, whose: str = "") -> None:
    parser.add_argument("--no-progress", action="store_true", help=f"no progress bar{whose}")


def _add_sampling_options(parser: argparse.ArgumentParser, verb: str) -> None:
    """--samples, --batch-size, --pruned and --posterior, which predict and uncertainty read alike."""
    parser.add_argument(
        "--samples",
        type=_number(int, "positive"),
        default=None,
        help=f"posterior samples (default: the run's; {FITTED_SAMPLES} for a posterior fitted after training)",
    )
    parser.add_argument("--batch-size", type=_number(int, "positive"), default=2000, help="inputs per batch")
    _add_pruned_option(parser, verb, default="none")
    fitted = [name for name, source in POSTERIORS.items() if issubclass(source, FittedSource)]
    parser.add_argument(
        "--posterior",
        type=_choice(list(POSTERIORS)),
        default=OWN,
        help=f"{verb} from this posterior: the run's own ({OWN}, the default), or one fitted around the "
        f"checkpoint as trained ({', '.join(fitted)}; a Laplace posterior predicts by its linearised net, "
        "--posterior-option predictive=samples for the net at sampled weights)",
    )
    _add_key_value(
        parser, "--posterior-option", "posterior_options", "an option of the posterior source, repeatable"
    )
    parser.add_argument("--fit-size", type=_number(int, "positive"), default=None, help=_fit_size_help())


FITTED_SAMPLES = 100  # the draws of a posterior fitted after training, by default (a flat-map run's own: 1)


# Parsed arguments that are not run options.
_NOT_OPTIONS = (
    "command",
    "argv",
    "out",
    "resume",
    "override",
    "no_progress",
    "net",
    "data",
    "method",
    "seed",
)


def _run_options(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS}


def _train(args) -> None:
    from pyrozoo import distributed
    from pyrozoo.bind import make_config, prior_function
    from pyrozoo.train import Run

    world = distributed.setup()  # several processes when torchrun started this one; rank 0 prints and writes
    log = _to_stderr if world.main else lambda text: None
    axes = {k: getattr(args, k, getattr(TrainConfig, k)) for k in ("net", "method", "data", "seed")}
    out = args.out or os.path.join("runs", run_name(**axes))
    if args.resume:
        given = {k: getattr(args, k) for k in axes if hasattr(args, k)}
        run = Run.open(out, log=log, override=args.override, **given, **_run_options(args))
    else:
        if args.override:
            raise PyrozooError("--override changes a resumed run: give it with --resume")
        run = Run(make_config(**axes, options=_run_options(args)), out, log=log)
    args.out = str(run.out)  # for the resume command an interrupt prints (main)
    c = run.config
    if args.resume and run.epoch >= c.epochs:
        epochs = f"{c.epochs} epoch{'s' if c.epochs != 1 else ''}"
        log(
            f"{run.out} has finished its {epochs}: nothing to train (give --epochs N, more than {c.epochs}, "
            "to extend it)"
        )
    elif args.resume:
        log(f"resuming {run.out} after epoch {run.epoch} (step {run.step}) of {c.epochs}")
    processes = f" ({world.size} processes)" if world.parallel else ""
    log(
        f"training {c.net} with {c.method}: {_with_options(prior_function(c).__name__, c.prior_options)} prior, "
        f"guide {_with_options(c.guide, c.guide_options)}, "
        f"{'no pruning while training' if run.reduction is None else 'BMR ' + run.reduction.describe()}; "
        f"{c.optimizer} lr {c.lr} in {c.lr_units} units; on {c.data} from {run.data.source}; "
        f"{c.epochs} epochs x {c.steps_per_epoch} steps, batch {c.batch_size}, {c.device}{processes}; "
        f"run folder {run.out}"
    )
    # the first step waits on torch.compile, silently otherwise
    if c.guide_options.get("kernel") == "compiled":
        log(
            "compiling IVON's kernels on the first step: about 40 s the first time, 12 s from torch's disk cache"
        )
    table = run.train(progress=not args.no_progress)
    distributed.finish()
    if not world.main:
        return
    score = next((col for col in ("accuracy", "rmse") if col in table), None)
    evaluated = table.dropna(subset=[score]) if score else table
    shown = REGRESSION_SUMMARY_COLUMNS if score == "rmse" else SUMMARY_COLUMNS
    columns = [col for col in shown if col in evaluated]
    print(f"\n{c.net} {c.method} on {c.data}: metrics per evaluated epoch (seconds = training time so far)")
    print(evaluated[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if len(evaluated) and score:
        _warn_if_input_free(run, evaluated.iloc[-1])
    written = sorted(p.name for p in run.out.iterdir() if p.is_file() and not p.name.startswith("."))
    folder = shlex.quote(str(run.out))
    print(f"\nwritten to {run.out}: {', '.join(written)}")
    steps = [
        (f"pyrozoo export {folder}", "the rebuilt plain PyTorch net, its size and latency"),
        (f"pyrozoo predict {folder} --out predictions.csv", "per-input predictions and their uncertainty"),
        (f"pyrozoo train --out {folder} --resume --epochs {c.epochs * 2}", "train on"),
    ]
    if run.reduction is None and not run.guide.point_mass:
        steps.insert(0, (f"pyrozoo prune {folder}", "one-shot BMR of the trained posterior -> pruned.pt"))
    _print_next(steps)


def _warn_if_input_free(run, last) -> None:
    """One line on stderr when the trained net's last evaluation beats no prediction that ignores the inputs
    (the class prior, the target mean): it learned a constant, and every command after it would only measure
    that (a flat-map MLP on toy1d at its defaults does)."""
    from pyrozoo.metrics import beats, input_free_scores

    reference = {k: v for k, v in input_free_scores(run.data).items() if k in last.index}
    scores = {k: float(last[k]) for k in reference}
    if reference and not beats(scores, reference):
        _to_stderr(
            f"pyrozoo: warning: the trained net is no better than {_input_free(run, scores, reference)}: it "
            "learned a constant. Train longer or with a larger --lr, or start the weights at the net's own "
            "initialisation (--start net)"
        )


def _input_free(run, scores: dict, reference: dict) -> str:
    """``predicting the class prior (the target mean) on the test set (nll 2.3 against 2.3, ...)``: the input-free
    prediction a warning compares ``scores`` with, over ``reference``'s keys."""
    what = "the target mean" if run.data.task == "regress" else "the class prior"
    against = ", ".join(f"{k} {scores[k]:.4g} against {v:.4g}" for k, v in sorted(reference.items()))
    return f"predicting {what} on the test set ({against})"


def _print_next(steps: list[tuple[str, str]]) -> None:
    """The commands a user may run next, each with what it gives."""
    width = max(len(command) for command, _ in steps)
    print("next:\n" + "\n".join(f"  {command:<{width}}  # {why}" for command, why in steps))


# the options of pyrozoo compress passed to compress() as they are, and recorded in its report
COMPRESS_OPTIONS = (
    "finetune_steps", "lr", "lr_schedule", "batch_size", "fit_size", "repeats", "seed", "allocation", "min_width",
    "device", "score", "curvature", "calibrate", "threads",
)  # fmt: skip


def _compress(args) -> None:
    from pyrozoo import distributed
    from pyrozoo.compress import REPORT_FILES, as_targets, check_reached, compress, load_trained_net, markdown
    from pyrozoo.io import check_replaceable

    world = distributed.setup()  # several processes when torchrun started this one; rank 0 prints and writes
    targets = as_targets(args.target or ["evidence"])
    if args.data is None:
        raw, warning = datasets.load_default(args.data_dir)
        if warning and world.main:
            print(f"pyrozoo: {warning}", file=sys.stderr)
    else:
        raw = datasets.load(args.data, args.data_dir)
    pad_to = args.pad_to or (NETS[args.net].pad_to if args.net in NETS else None)
    d = datasets.prepare(raw, pad_to=pad_to)
    if d.task != "classify":
        raise PyrozooError(f"compress takes a classification data set; {raw.name} is a regression one")
    net_options = dict(parse_option(text) for text in args.net_option or [])
    net = load_trained_net(args.net, args.weights, d, trust_pickle=args.trust_pickle, net_options=net_options)
    out = Path(args.out or Path("compressed") / args.net.replace(":", "-").replace("/", "-"))
    check_replaceable(out, REPORT_FILES)  # before the work: a folder it would refuse to replace costs none
    options = {name: getattr(args, name) for name in COMPRESS_OPTIONS}
    result = compress(
        net,
        d,
        targets,
        baselines=tuple(args.baselines),
        progress=not args.no_progress,
        log=_to_stderr,
        **options,
    )
    distributed.finish()
    if not world.main:
        return
    command = shlex.join(["pyrozoo", *args.argv])
    result.save(out, command=command, net=args.net, weights=args.weights, net_options=net_options)
    print(markdown(result.table))
    print(
        f"written to {out}: report.json, report.md, front.png, front.pdf, nets/ (state_dict.pt, net.pt, net.pt2)"
    )
    check_reached(result.table)


def _with_options(name: str, options: dict) -> str:
    """``name(k=v, ...)``, or the name alone when no option is set: a component as the start line shows it."""
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in options.items())})" if options else name


def _compare(args) -> None:
    from pyrozoo.compare import LAUNCHERS, RESULTS, TABLE, make_grid, run_grid, summary_markdown

    given = {k.replace("-", "_"): v for k, v in vars(args).items()}
    for key in (
        "command",
        "argv",
        "config",
        "no_plots",
        "no_progress",
        "launcher",
        "jobs",
        "slurm_options",
        "no_wait",
    ):
        given.pop(key, None)
    grid = make_grid(args.config, **given)
    progress = not args.no_progress
    if args.launcher == "local":
        for flag, used in (("--slurm-option", hasattr(args, "slurm_options")), ("--no-wait", args.no_wait)):
            if used:
                raise PyrozooError(f"{flag} belongs to --launcher slurm")
        launcher = LAUNCHERS["local"](jobs=getattr(args, "jobs", 1))
    else:
        if hasattr(args, "jobs"):
            raise PyrozooError("--jobs belongs to --launcher local (Slurm runs as many jobs as it schedules)")
        launcher = LAUNCHERS["slurm"](options=getattr(args, "slurm_options", {}), wait=not args.no_wait)
    results = run_grid(grid, progress=progress, launcher=launcher)
    if results is None:
        print(
            f"grid {grid.out}: jobs submitted; when they are done, the same command collects the results "
            "(a cell still queued then is submitted again: whichever of its jobs starts second finds it finished, "
            "or running and stops)"
        )
        return
    summary = summary_markdown(results)
    atomic_write_text(grid.out / TABLE, summary)
    print(f"grid {grid.out}: {len(results)} rows in {grid.out / RESULTS}, summary in {grid.out / TABLE}\n")
    print(summary)
    if not args.no_plots:
        _plot_files(grid.out, results)


def _plot_files(folder, results=None) -> None:
    from pyrozoo.plots import plot_grid

    paths = plot_grid(folder, results, log=_to_stderr)
    print(f"figures in {folder}: {', '.join(sorted({p.stem for p in paths}))} (PNG and PDF)")


def _table(rows: dict[str, dict]) -> str:
    import pandas as pd

    # a row per label, so that each metric keeps its own type (counts print as whole numbers)
    return pd.DataFrame.from_dict(rows, orient="index").to_string(float_format=lambda v: f"{v:.4f}")


def _prune(args) -> None:
    from pyrozoo.bmr import make_reduction
    from pyrozoo.trained import load

    aliases = {k: getattr(args, k) for k in ("margin", "threshold", "count_pruned") if hasattr(args, k)}
    given = getattr(args, "rule_options", {})
    clash = [k for k in aliases if k in given and given[k] != aliases[k]]
    if clash:
        raise PyrozooError(f"--{clash[0].replace('_', '-')} and rule option {clash[0]} disagree")
    options = {**aliases, **given}
    rule = args.rule
    if hasattr(args, "sparsity"):
        if rule not in ("threshold", "sparsity") or "sparsity" in given:
            raise PyrozooError(
                "--sparsity is the sparsity rule's option: give it alone or with --rule sparsity"
            )
        rule, options = "sparsity", {**options, "sparsity": args.sparsity}
    reduction = make_reduction(rule, **options)  # a wrong option fails before the run is loaded
    source = make_source(args.posterior, getattr(args, "posterior_options", {}), fit_size=args.fit_size)
    run = load(args.run, log=_to_stderr)
    pruned = source.prune(run, reduction, progress=not args.no_progress)
    print(pruned.line)
    _print_report(pruned.report)
    print(_table({pruned.before_label: pruned.before, "after": pruned.after}))
    _warn_if_collapsed(run, pruned.before, pruned.after)
    folder, which = shlex.quote(str(run.out)), f" --pruned {source.name}"
    _print_next(
        [
            (f"pyrozoo export {folder}{which}", "the pruned net rebuilt, its dead units cut, timed"),
            (f"pyrozoo predict {folder}{which} --out predictions.csv", "the pruned net's predictions"),
        ]
    )


def _warn_if_collapsed(run, before: dict, after: dict) -> None:
    """One line on stderr when the pruning took the net from better than an input-free prediction (the class
    prior, the target mean) to no better: the state is written as asked, but the net is useless."""
    from pyrozoo.metrics import beats, input_free_scores

    reference = input_free_scores(run.data)
    lost = beats(before, reference) - beats(after, reference)
    if lost:
        print(
            f"pyrozoo: warning: the pruned net is no better than "
            f"{_input_free(run, after, {k: reference[k] for k in lost})}: ask for less (a lower sparsity, or the "
            "evidence's own rule, --rule threshold)",
            file=sys.stderr,
        )


def _print_report(report) -> None:
    print(report.table().to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(
        "(kept: each layer's weights this pass kept; the pruned fraction also counts the weights of units that "
        "died with them, left without inputs or consumers)"
    )


def _sweep(args) -> None:
    from pyrozoo.sweep import below_dense, sweep, write_sweep
    from pyrozoo.trained import load

    run = load(args.run, log=_to_stderr)
    table = sweep(
        run,
        args.sparsities,
        getattr(args, "methods", None),
        args.finetune_steps,
        progress=not args.no_progress,
        log=_to_stderr,
        fit_size=args.fit_size,
        posterior_options=getattr(args, "posterior_options", {}),
        samples=args.samples,
    )
    out = args.out or run.out / "sweep"
    paths = write_sweep(table, out)
    shown = table.drop(columns=["net", "data", "ece15", "brier", "lpd"], errors="ignore")
    score = "RMSE" if "rmse" in table else "accuracy"
    how = "evaluated at the point estimate"
    if args.samples:
        how += (
            f" (predictive point) and, for BMR, by the reduced posterior's predictive ({args.samples} draws)"
        )
    print(f"{run.out} (epoch {run.epoch}): {score}-sparsity curve, one shot, {how}")
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    worse = "RMSE is 1% above" if "rmse" in table else "accuracy is 1 point below"
    print(f"\nwhere each one's {worse} the dense net's:")
    print(below_dense(table).to_string(index=False))
    print(f"written: {', '.join(str(p) for p in paths)}")


def _export(args) -> None:
    from pyrozoo.export import export
    from pyrozoo.trained import load

    run = load(args.run, log=_to_stderr)
    source = chosen_pruned(run, args.pruned, log=_to_stderr)
    nets = None
    state = "checkpoint" if source is None else source.file
    if source is not None:
        nets = source.load_pruned(run)  # refused if pruned from an older checkpoint, or not there
    source = {"state": state, **run.source()}
    summary = export(run, run.out / "export", repeats=args.repeats, source=source, nets=nets)
    print(
        f"{run.out} ({state}, epoch {run.epoch}, step {run.step}) exported to {run.out / 'export'}: "
        f"sparse_net.pt, sparse_state_dict.pt, sparse.pt2 (torch.export); CPU, {summary['threads']} "
        f"thread{'s' * (summary['threads'] != 1)}"
    )
    # full shapes: the pruned net in the trained net's shapes (pruned weights at zero); then with dead units cut
    print(
        _table(
            {"pruned, full shapes": summary["full_shapes"], "pruned, dead units cut": summary["units_cut"]}
        )
    )
    if summary["full_shapes"]["parameters"] == summary["units_cut"]["parameters"]:
        nonzero = summary["units_cut"]["nonzero_parameters"]
        print(
            "no unit is dead: the net keeps its shapes (the latency difference is noise), and "
            + (
                f"its {nonzero:,d} non-zero parameters are {summary['nonzero_ratio']:.1f}x fewer than its parameters"
                if summary["nonzero_ratio"] >= 1.05
                else f"{nonzero:,d} of its {summary['trained_parameters']:,d} parameters are non-zero: nothing "
                "was pruned to speak of "
                + (
                    "(the trained net as --pruned none asked)"
                    if args.pruned == "none"
                    else "(pyrozoo prune RUN first)"
                )
            )
        )
    else:
        speed = summary["speedup_batch256"]
        print(
            f"dead units cut: {summary['parameter_ratio']:.1f}x fewer parameters (the non-zero ones "
            f"{summary['nonzero_ratio']:.1f}x fewer than the full shapes' parameters), at batch 256 "
            + (f"{speed:.1f}x faster" if speed >= 1 else f"{1 / speed:.1f}x slower")
        )


def _open_for_prediction(args, write: bool, folder=None):
    """The run (``folder``, else ``args.run``; with its pruned state if asked), its raw data, the pruned plain net
    when the state asked for is one (else None), and that state's name (``checkpoint``, or the pruned file), for
    predict and uncertainty; ``write``: the command writes into the run folder."""
    from pyrozoo.trained import load

    fitted = None
    if args.posterior != OWN or getattr(args, "posterior_options", {}):
        # refused before the run is loaded: a fitted posterior of the checkpoint, and its options
        fitted = make_source(args.posterior, getattr(args, "posterior_options", {}), fit_size=args.fit_size)
        if args.pruned not in (None, "none"):
            raise PyrozooError(
                f"--posterior {args.posterior} is fitted around the checkpoint as trained; leave out --pruned "
                f"{args.pruned} (or predict the pruned net alone: --pruned {args.pruned} without --posterior)"
            )
    run = load(args.run if folder is None else folder, log=_to_stderr, write=write)
    if fitted is not None:
        inputs = f"{args.fit_size:,}" if args.fit_size else "all its"
        _to_stderr(f"fitting {fitted.name} around {run.out}'s weights on {inputs} training inputs")
        start = time.perf_counter()
        model, posterior = fitted.fit(run, progress=not args.no_progress)
        about = fitted.summary(model)
        _to_stderr(
            f"{fitted.name}: fitted in {time.perf_counter() - start:.1f} s" + (f"; {about}" if about else "")
        )
        run = run.with_posterior(model, posterior)
        source, state = None, f"{fitted.name}-{fitted.predictive}"
    else:
        source = chosen_pruned(run, args.pruned, log=_to_stderr)
        state = "checkpoint" if source is None else source.file
    nets = None if source is None else source.load_pruned(run)
    c = run.config
    raw = datasets.load(c.data, c.data_dir, target=c.target, task=c.task)
    return run, raw, None if nets is None else nets[0].to(run.data.x_test.device), state


def _prediction_samples(args, run, net) -> int:
    """How many draws predict and uncertainty average: one of a point mass or a plain net; else --samples, or
    the run's (a posterior fitted after training: FITTED_SAMPLES, as a point-mass run's own is 1)."""
    if net is not None or run.guide.point_mass:
        return 1
    return args.samples or (FITTED_SAMPLES if run.fitted else run.config.samples)


def _predict(args) -> None:
    from pyrozoo.predict import (
        align_table,
        classification_summary,
        predict_frame,
        prepare_like,
        read_inputs,
        regression_summary,
    )
    from pyrozoo.shift import SHIFTS

    run, raw, net, state = _open_for_prediction(
        args, write=False
    )  # predict writes nothing into the run folder
    with run:
        c = run.config
        samples = _prediction_samples(args, run, net)
        if args.input is not None:
            x, y = read_inputs(args.input, raw, c.target)
            if y is not None:  # say so: the column is not an input, and the rows are scored against it
                print(
                    f"{args.input}: column {c.target!r} is the run's target, so it is not an input: each row "
                    "is scored against it (target, "
                    f"{'error' if raw.task == 'regress' else 'correct'}, nll)",
                    file=sys.stderr,
                )
            elif c.target is not None and args.input.lower().endswith(".csv"):
                print(
                    f"{args.input}: no column {c.target!r} (the run's target): predictions only, not scored",
                    file=sys.stderr,
                )
        elif args.data is not None:
            other = datasets.load(
                args.data, c.data_dir, target=c.target, task=c.task if args.data.endswith(".csv") else None
            )
            if other.x_test.shape[1:] != raw.x_test.shape[1:]:
                raise PyrozooError(
                    f"{args.data} has inputs of shape {tuple(other.x_test.shape[1:])}, the run "
                    f"was trained on {tuple(raw.x_test.shape[1:])}"
                )
            x, y = align_table(other, raw)
        else:
            x, y = raw.x_test, raw.y_test
        if args.shift:
            if x.is_floating_point():
                raise PyrozooError(
                    f"--shift makes shifted images; {raw.name}'s inputs are features, not images"
                )
            x = SHIFTS[args.shift](x, args.severity, seed=c.seed)
        known = y is not None
        prepared = prepare_like(run, raw, x, y)
        predictions, frame = predict_frame(
            run, prepared, samples, args.batch_size, not args.no_progress, known, net=net
        )
        atomic_write(args.out, lambda p: frame.to_csv(p, index=False))
        draws = (
            "the pruned plain net" if net is not None else f"{samples} posterior sample{'s' * (samples > 1)}"
        )
        print(f"{len(frame)} predictions of {state} ({draws}) in {args.out}", file=sys.stderr)
        if known:
            if prepared.task == "classify":
                summary = classification_summary(predictions, prepared.y_test)
            else:
                summary = regression_summary(frame)
            print(" ".join(f"{k} {v:.4f}" for k, v in summary.items()))


def _uncertainty(args) -> None:
    from pyrozoo.predict import uncertainty_table

    if args.ood is not None:
        return _ood(args)
    if len(args.run) != 1 or args.mc_dropout or args.ensemble or args.out:
        given = [f for f, v in (("--mc-dropout", args.mc_dropout), ("--ensemble", args.ensemble),
                                ("--out", args.out)) if v]  # fmt: skip
        raise PyrozooError(
            f"{' and '.join(given or [f'{len(args.run)} runs'])}: the shift table is of one run; the table of "
            "runs and baselines is out-of-distribution detection: add --ood DATASET (e.g. --ood digits)"
        )
    run, raw, net, state = _open_for_prediction(
        args, write=True, folder=args.run[0]
    )  # its table goes into the run folder
    with run:
        samples = _prediction_samples(args, run, net)
        table = uncertainty_table(run, raw, samples, args.batch_size, progress=not args.no_progress, net=net)
        table.insert(0, "samples", samples)
        table.insert(0, "state", state)
        # one file per state measured, so measuring a pruned one keeps the trained one's
        path = run.out / (
            "uncertainty.csv" if state == "checkpoint" else f"uncertainty-{Path(state).stem}.csv"
        )
        atomic_write(path, lambda p: table.to_csv(p, index=False))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"written: {path}", file=sys.stderr)


def _run_predictor(args, run, net, samples: int):
    """The run's predictions on prepared inputs as the command asks: its posterior from ``samples`` draws, or the
    pruned plain net ``net``; every row of ``uncertainty --ood`` that is a run's own comes from here."""
    from pyrozoo.predict import predict

    model, guide = (run.model, run.guide) if net is None else (net, None)
    return lambda x: predict(model, guide, x, samples, batch_size=args.batch_size, seed=run.config.seed)


def _ood_predictions(args, folder, keep, dropout: bool, into_run: bool, first: dict, measured: dict) -> dict:
    """``uncertainty --ood``: predictions of the run in ``folder`` on its test set and on the OOD set, by its
    posterior and, when asked and its net has dropout, by MC dropout; once per folder (``measured``). ``first``
    holds the first run's data set and OOD inputs; ``keep`` holds the run's lock when its table goes into it.
    """
    import contextlib

    from pyrozoo.bmr.rebuild import rebuild
    from pyrozoo.ood import dropout_layers, mc_dropout, ood_inputs
    from pyrozoo.predict import prepare_like

    key = str(Path(folder).resolve())
    if key in measured and (not dropout or "mc" in measured[key]):
        return measured[key]
    run, raw, net, state = _open_for_prediction(args, write=into_run, folder=folder)
    if into_run:
        keep.enter_context(run)  # the lock held until the run's table is written
    with contextlib.nullcontext() if into_run else run:
        c = run.config
        if raw.task != "classify":
            raise PyrozooError(f"--ood scores class probabilities; {folder} is a {raw.task} run")
        if not first:
            first.update(data=c.data, x=ood_inputs(args.ood, raw, c.data_dir))
        elif c.data != first["data"]:
            raise PyrozooError(
                f"the table compares runs on one test set: {folder} was trained on {c.data}, the first "
                f"run on {first['data']}"
            )
        x_in, y = run.data.x_test, run.data.y_test.cpu()
        x_out = prepare_like(run, raw, first["x"]).x_test
        samples = _prediction_samples(args, run, net)
        predict = _run_predictor(args, run, net, samples)
        found = {"method": c.method, "state": state, "samples": samples, "y": y}
        found["posterior"] = (predict(x_in), predict(x_out))
        if dropout:
            plain = net if net is not None else rebuild(run.model, run.guide, remove_dead=False)
            # a pruned state's net is MC dropout's too; a fitted posterior's mean is the run's own net
            found["mc_state"] = state if net is not None else "checkpoint"
            if dropout_layers(plain):
                found["mc"] = tuple(
                    mc_dropout(plain, x, args.mc_dropout, c.seed, args.batch_size) for x in (x_in, x_out)
                )
            else:
                found["mc"] = None
                _to_stderr(f"{folder}: its net has no dropout, so no MC dropout row")
    measured[key] = found
    return found


def _ood(args) -> None:
    """``uncertainty --ood``: one row per run (its posterior), per run with dropout (MC dropout) and per
    ensemble; in-distribution accuracy, NLL, ECE, and the out-of-distribution AUROC/AUPR of entropy and MI."""
    import contextlib

    import pandas as pd

    from pyrozoo.io import make_folder
    from pyrozoo.ood import SHOWN, ensemble, ood_name, ood_row
    from pyrozoo.plots import plot_ood

    groups = args.ensemble or []
    if not args.run and not groups:
        raise PyrozooError("uncertainty --ood needs a run folder, or --ensemble RUN RUN ...")
    if any(len(group) < 2 for group in groups):
        raise PyrozooError("--ensemble needs at least two run folders (--ensemble RUN RUN ...)")
    into_run = args.out is None  # the table of one run goes into its folder, as uncertainty.csv does
    if into_run and (len(args.run) != 1 or groups):
        raise PyrozooError(
            "a table of several runs or of an ensemble goes into a folder of its own: give --out FOLDER"
        )
    name, first, measured = ood_name(args.ood), {}, {}
    rows, figure = [], {}

    def add(label, folders, y, predictions, samples, state):
        if state != "checkpoint":  # a pruned state, or a posterior fitted in place of the run's own
            label = f"{label} ({Path(state).stem})"
        label = label if label not in figure else f"{label} [{' '.join(folders)}]"
        inside, outside = predictions
        rows.append(
            {"row": label, "runs": " ".join(folders), "state": state, "samples": samples, "ood": name,
             "ood_count": len(outside["entropy"]), **ood_row(inside, y, outside)}
        )  # fmt: skip
        figure[label] = (inside, y, outside)

    with contextlib.ExitStack() as keep:
        for folder in args.run:
            found = _ood_predictions(
                args, folder, keep, args.mc_dropout is not None, into_run, first, measured
            )
            y, state = found["y"], found["state"]
            add(found["method"], [folder], y, found["posterior"], found["samples"], state)
            if found.get("mc") is not None:
                mc_label, mc_state = f"{found['method']} mc-dropout", found["mc_state"]
                add(mc_label, [folder], y, found["mc"], args.mc_dropout, mc_state)
        for group in groups:
            members = [
                _ood_predictions(args, folder, keep, False, into_run, first, measured) for folder in group
            ]
            methods = "/".join(dict.fromkeys(m["method"] for m in members))
            predictions = tuple(ensemble([m["posterior"][i] for m in members]) for i in (0, 1))
            states = "/".join(dict.fromkeys(m["state"] for m in members))
            add(f"ensemble of {len(group)} {methods}", group, members[0]["y"], predictions,
                sum(m["samples"] for m in members), states)  # fmt: skip
        table = pd.DataFrame(rows)
        states = set(table["state"])
        # the file names the state its rows share (a pruned file, a fitted posterior), so no other is overwritten
        state = states.pop() if len(states) == 1 else "checkpoint"
        stem = f"ood-{name}" if state == "checkpoint" else f"ood-{name}-{Path(state).stem}"
        folder = Path(args.run[0]) if into_run else make_folder(args.out)
        path = folder / f"{stem}.csv"
        atomic_write(path, lambda p: table.to_csv(p, index=False))
        plots = plot_ood(figure, folder, stem, ood=name)
    shown = ["row", "samples", *(c for c in SHOWN if c in table)]
    print(table[shown].to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))
    _to_stderr(f"written: {path}; figure {', '.join(str(p) for p in plots)}")


def _info() -> None:
    # Wrapped to a terminal's width ($COLUMNS, else its own); piped into grep or a file, one line per entry.
    wrap = sys.stdout.isatty()
    width = max(60, shutil.get_terminal_size().columns - 1) if wrap else 10**6

    def section(title: str, rows) -> None:
        print(textwrap.fill(f"{title}:", width, subsequent_indent="  "))
        for name, text in rows:
            lead = f"  {name:20s} "
            print(textwrap.fill(text, width, initial_indent=lead, subsequent_indent=" " * len(lead)))

    def with_options(factory, shared=()) -> str:
        names = [name for name in option_names(factory) if name not in shared]
        return f" [options: {', '.join(names)}]" if names else ""

    section(
        "nets",
        [
            *((name, f"{text} [options: {', '.join(net_options(name))}]") for name, text in NETS.described()),
            *((f"{prefix}:NAME", f"any {library} classification model by name, no pretrained weights unless "
               "--net-option weights=FILE") for prefix, library in PREFIXES.items()),  # fmt: skip
        ],
    )
    section(
        "methods",
        (
            (
                name,
                f"{m.description} (prior {m.prior.__name__}, guide {m.guide}, {m.optimizer} lr {m.lr} "
                f"in {m.lr_units} units" + (f", reduction {m.reduction.describe()})" if m.reduction else ")"),
            )
            for name, m in METHODS.items()
        ),
    )
    section(
        "reductions (each also takes allow_empty: true lets it cut the net's last path from input to output)",
        ((name, describe(cls) + with_options(cls, ("allow_empty",))) for name, cls in REDUCTIONS.items()),
    )
    section("priors", ((name, describe(fn) + with_options(fn)) for name, fn in PRIORS.items()))
    section("guides", GUIDES.described())
    section(
        "posterior sources (pyrozoo prune --posterior)",
        ((name, text + with_options(POSTERIORS[name])) for name, text in POSTERIORS.described()),
    )
    section("optimizers", OPTIMIZERS.described())
    section("baselines", BASELINES.described())
    section("likelihoods", LIKELIHOODS.described())
    section("shifts (pyrozoo uncertainty)", SHIFTS.described())
    section(
        "datasets",
        ((name, f"{info.description} [{info.task}]; {datasets.availability(name)}")
         for name, info in datasets.DATASETS.items()),  # fmt: skip
    )
    section("optional extras", _extras())


# What each optional part of pyrozoo needs: (module to find, what it gives, how to install it).
_EXTRAS = (
    ("torchvision", "tv:NAME nets and dataset downloads", "pip install torchvision"),
    ("timm", "timm:NAME nets, and the vit and mixer nets", "pip install timm"),
    ("transformers", "Hugging Face models as nets (Python API)", "pip install transformers"),
    ("sklearn", "the diabetes data set", "pip install 'pyrozoo[tabular]'"),
    ("submitit", "pyrozoo compare --launcher slurm", "pip install 'pyrozoo[cluster]'"),
    ("mkdocs", "the documentation site (mkdocs serve)", "pip install 'pyrozoo[docs]'"),
)


def _extras():
    """``(module, whether it is installed here and what it gives)`` for ``pyrozoo info``."""
    for module, gives, install in _EXTRAS:
        here = importlib.util.find_spec(module) is not None
        yield module, f"{gives}: {'installed' if here else 'not installed (' + install + ')'}"


def main(argv: list[str] | None = None) -> int:
    args = None
    try:
        args = build_parser().parse_args(argv)
        args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as given, for the records
        commands = {
            "train": _train,
            "compare": _compare,
            "plot": lambda a: _plot_files(a.grid),
            "prune": _prune,
            "sweep": _sweep,
            "export": _export,
            "compress": _compress,
            "predict": _predict,
            "uncertainty": _uncertainty,
            "info": lambda _: _info(),
        }
        commands[args.command](args)
    except PyrozooError as e:
        from pyrozoo.distributed import RankZeroStopped

        if not isinstance(e, RankZeroStopped):  # rank 0 of a data-parallel run has printed that one
            print(f"pyrozoo: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        command = getattr(args, "command", None)
        if command == "train" and getattr(args, "out", None) and (Path(args.out) / "checkpoint.pt").exists():
            again = f"pyrozoo train --out {shlex.quote(args.out)} --resume"
        elif command == "train" and getattr(args, "out", None):  # no epoch finished: nothing to resume yet
            again = None
            print(
                "pyrozoo: interrupted before the first epoch finished, so there is nothing to resume; start "
                f"again with: {shlex.join(['pyrozoo', *args.argv])}",
                file=sys.stderr,
            )
            return 130
        elif command == "compare":
            again = shlex.join(["pyrozoo", *(sys.argv[1:] if argv is None else argv)])
        else:
            again = None
        print(
            "pyrozoo: interrupted; "
            + (
                f"continue from the last finished epoch with: {again}"
                if again
                else "nothing was left half-written"
            ),
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # the reader of our output went away (| head): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception:  # not a mistake of the user's: keep the traceback, and an exit code of its own
        traceback.print_exc()
        print(
            f"pyrozoo: internal error (exit code {BUG_EXIT_CODE}): this is a bug in pyrozoo; please report it "
            "with the command and the traceback above",
            file=sys.stderr,
        )
        return BUG_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
