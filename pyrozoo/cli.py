"""The ``pyrozoo`` command: ``train``, ``compare``, ``plot``, ``prune``, ``export`` and ``info``.

Run options are not declared here: the flags of ``train`` and ``compare`` are built from
:class:`pyrozoo.config.TrainConfig`'s fields and :data:`pyrozoo.config.ALIASES`, and every name a flag takes is
checked against its registry.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import traceback

from pyrozoo import data as datasets
from pyrozoo.baselines import BASELINES
from pyrozoo.bmr import REDUCTIONS
from pyrozoo.config import ALIASES, TABLES, TrainConfig, run_name, run_option_fields
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import GUIDES
from pyrozoo.io import atomic_write_text
from pyrozoo.methods import METHODS
from pyrozoo.models.priors import PRIORS
from pyrozoo.nets import NETS, net_options
from pyrozoo.optim import OPTIMIZERS
from pyrozoo.options import parse_option
from pyrozoo.registry import describe, option_names

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
# Exit codes: 0 done, 2 a user's mistake (PyrozooError, one line), 1 a diverged loss (TrainingDiverged), 3 a bug
# (any other exception, with its traceback), 130 interrupted.
BUG_EXIT_CODE = 3
REGISTRIES = {"guides": GUIDES, "optimizers": OPTIMIZERS, "priors": PRIORS, "reductions": REDUCTIONS}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, as for every other user error
        raise PyrozooError(f"{self.prog}: {message}")


def _number(kind: type, check: str | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if not math.isfinite(value):
            sign = f"{check} " if check else ""
            raise argparse.ArgumentTypeError(f"must be a finite {sign}number, got {text!r}")
        if check == "positive" and not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {value}")
        if check == "non-negative" and not value >= 0:
            raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
        return value

    return parse


def _choice(known):
    def check(text: str) -> str:
        if text not in known:
            raise argparse.ArgumentTypeError(f"unknown name {text!r}; choose from {', '.join(known)}")
        return text

    return check


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
    for f in run_option_fields():
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if f.name in TABLES:
            _add_key_value(parser, f"--{TABLES[f.name]}-option", f.name, meta["help"])
            continue
        kind = next((k for k in typing.get_args(hints[f.name]) if k is not type(None)), hints[f.name])
        kwargs = {"help": meta["help"], "default": argparse.SUPPRESS}
        if kind is bool:
            parser.add_argument(flag, action="store_true", **kwargs)
        elif meta.get("choices"):
            parser.add_argument(flag, type=_choice(list(REGISTRIES[meta["choices"]])), **kwargs)
        elif kind in (int, float):
            parser.add_argument(flag, type=_number(kind, meta.get("check")), **kwargs)
        else:
            parser.add_argument(flag, **kwargs)
    for name, alias in ALIASES.items():
        flag = "--" + name.replace("_", "-")
        if alias.kind is bool:
            parser.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=alias.help)
        else:
            parser.add_argument(flag, type=_number(alias.kind), default=argparse.SUPPRESS, help=alias.help)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyrozoo", description="Bayesian sparsification of deep networks with Pyro and BMR."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    quiet = argparse.SUPPRESS

    train = sub.add_parser("train", help="train a Bayesian net by SVI into a run folder")
    train.add_argument(
        "--net", type=_choice(NETS), default=quiet, help="net (default lenet; or tv:NAME, timm:NAME)"
    )
    train.add_argument(
        "--data",
        type=_choice(list(datasets.DATASETS)),
        default=quiet,
        help="dataset (default: fashion-mnist, or the bundled fashion-mnist-mini if it is missing)",
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
    compare.add_argument("--nets", nargs="+", type=_choice(NETS), default=quiet)
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
        type=_choice(list(datasets.DATASETS)),
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
    _add_run_options(compare)

    plot = sub.add_parser(
        "plot", help="redraw a grid folder's figures from its results.csv (and run folders)"
    )
    plot.add_argument("grid", help="grid folder written by pyrozoo compare")

    prune = sub.add_parser("prune", help="one-shot BMR of a finished mean-field run (writes RUN/pruned.pt)")
    prune.add_argument("run", help="run folder")
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

    export = sub.add_parser(
        "export", help="rebuild the run's sparse net, save it, compare it with the dense one"
    )
    export.add_argument("run", help="run folder (its pruned.pt is used when there is one)")
    export.add_argument(
        "--repeats", type=_number(int, "positive"), default=50, help="timed forward passes per latency"
    )

    sub.add_parser("info", help="list nets, methods, reductions, priors, guides and datasets")
    return parser


# Parsed arguments that are not run options.
_NOT_OPTIONS = ("command", "out", "resume", "override", "no_progress", "net", "data", "method", "seed")


def _run_options(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in _NOT_OPTIONS}


def _train(args) -> None:
    from pyrozoo.config import make_config
    from pyrozoo.train import Run

    log = lambda text: print(text, file=sys.stderr)  # noqa: E731
    axes = {k: getattr(args, k, getattr(TrainConfig, k)) for k in ("net", "method", "data", "seed")}
    out = args.out or os.path.join("runs", run_name(**axes))
    if args.resume:
        given = {k: getattr(args, k) for k in axes if hasattr(args, k)}
        run = Run.open(out, log=log, override=args.override, **given, **_run_options(args))
    else:
        if args.override:
            raise PyrozooError("--override changes a resumed run: give it with --resume")
        run = Run(make_config(**axes, options=_run_options(args)), out, log=log)
    c = run.config
    print(
        f"training {c.net} with {c.method} (guide {c.guide}, {c.optimizer} lr {c.lr}) "
        f"on {c.data} from {run.data.source}; "
        f"{c.epochs} epochs x {c.steps_per_epoch} steps, batch {c.batch_size}, {c.device}; run folder {run.out}",
        file=sys.stderr,
    )
    table = run.train(progress=not args.no_progress)
    evaluated = table.dropna(subset=["accuracy"]) if "accuracy" in table else table
    columns = [col for col in SUMMARY_COLUMNS if col in evaluated]
    print(f"\n{c.net} {c.method} on {c.data}: metrics per evaluated epoch (seconds = training time so far)")
    print(evaluated[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def _compare(args) -> None:
    from pyrozoo.compare import RESULTS, TABLE, make_grid, run_grid, summary_markdown

    given = {k.replace("-", "_"): v for k, v in vars(args).items()}
    for key in ("command", "config", "no_plots", "no_progress"):
        given.pop(key, None)
    grid = make_grid(args.config, **given)
    progress = not args.no_progress
    results = run_grid(grid, progress=progress)
    summary = summary_markdown(results)
    atomic_write_text(grid.out / TABLE, summary)
    print(f"grid {grid.out}: {len(results)} rows in {grid.out / RESULTS}, summary in {grid.out / TABLE}\n")
    print(summary)
    if not args.no_plots:
        _plot_files(grid.out, results)


def _plot_files(folder, results=None) -> None:
    from pyrozoo.plots import plot_grid

    paths = plot_grid(folder, results, log=lambda text: print(text, file=sys.stderr))
    print(f"figures in {folder}: {', '.join(sorted({p.stem for p in paths}))} (PNG and PDF)")


def _table(rows: dict[str, dict]) -> str:
    import pandas as pd

    return pd.DataFrame(rows).T.to_string(float_format=lambda v: f"{v:.4f}")


def _prune(args) -> None:
    from pyrozoo.bmr import make_reduction
    from pyrozoo.train import Run

    aliases = {k: getattr(args, k) for k in ("margin", "threshold", "count_pruned") if hasattr(args, k)}
    given = getattr(args, "rule_options", {})
    clash = [k for k in aliases if k in given and given[k] != aliases[k]]
    if clash:
        raise PyrozooError(f"--{clash[0].replace('_', '-')} and rule option {clash[0]} disagree")
    options = {**aliases, **given}
    reduction = make_reduction(args.rule, **options)  # a wrong option fails before the run is loaded
    run = Run.open(args.run, log=lambda text: print(text, file=sys.stderr))
    before = run.evaluate()
    report = reduction(run.model, run.guide)
    after = run.evaluate()
    run.save_pruned(report, after)
    print(
        f"pruning ({reduction.describe()}) of {run.out} after epoch {run.epoch} (step {run.step}): "
        f"{report.seconds * 1e3:.1f} ms, pruned fraction {report.pruned_fraction:.4f}; state written to "
        f"{run.out / 'pruned.pt'}"
    )
    print(report.table().to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(_table({"before": before, "after": after}))


def _export(args) -> None:
    from pyrozoo.export import export
    from pyrozoo.train import PRUNED, Run

    run = Run.open(args.run, log=lambda text: print(text, file=sys.stderr))
    state = "checkpoint"
    if (run.out / PRUNED).exists():
        run.load_pruned()  # refused if it was pruned from an older checkpoint
        state = PRUNED
    source = {"state": state, **run.source()}
    summary = export(run, run.out / "export", repeats=args.repeats, source=source)
    print(
        f"{run.out} ({state}, epoch {run.epoch}, step {run.step}) exported to {run.out / 'export'}: "
        f"sparse_state_dict.pt, sparse.pt2 (torch.export); CPU, {summary['threads']} threads"
    )
    print(_table({k: summary[k] for k in ("dense", "sparse")}))
    print(
        f"parameters {summary['parameter_ratio']:.1f}x fewer ({summary['nonzero_ratio']:.1f}x fewer non-zero), "
        "at batch 256 "
        + (
            f"{summary['speedup_batch256']:.1f}x faster"
            if summary["speedup_batch256"] >= 1
            else f"{1 / summary['speedup_batch256']:.1f}x slower"
        )
    )


def _info() -> None:
    def section(title: str, rows) -> None:
        print(f"{title}:")
        for name, text in rows:
            print(f"  {name:20s} {text}")

    def with_options(factory) -> str:
        names = option_names(factory)
        return f" [options: {', '.join(names)}]" if names else ""

    section(
        "nets",
        ((name, f"{text} [options: {', '.join(net_options(name))}]") for name, text in NETS.described()),
    )
    section(
        "methods",
        (
            (
                name,
                f"{m.description} (prior {m.prior.__name__}, guide {m.guide}, {m.optimizer} lr {m.lr}"
                + (f", reduction {m.reduction.describe()})" if m.reduction else ")"),
            )
            for name, m in METHODS.items()
        ),
    )
    section("reductions", ((name, describe(cls) + with_options(cls)) for name, cls in REDUCTIONS.items()))
    section("priors", ((name, describe(fn) + with_options(fn)) for name, fn in PRIORS.items()))
    section("guides", GUIDES.described())
    section("optimizers", OPTIMIZERS.described())
    section("baselines", BASELINES.described())
    section(
        "datasets",
        (
            (
                name,
                f"{info.description}; "
                + (f"found in {where}" if (where := datasets.locate(name)) else "not found locally"),
            )
            for name, info in datasets.DATASETS.items()
        ),
    )


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        commands = {
            "train": _train,
            "compare": _compare,
            "plot": lambda a: _plot_files(a.grid),
            "prune": _prune,
            "export": _export,
            "info": lambda _: _info(),
        }
        commands[args.command](args)
    except PyrozooError as e:
        print(f"pyrozoo: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(
            "pyrozoo: interrupted; a killed run continues with --resume (a grid: the same compare command) "
            "from its last finished epoch",
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
