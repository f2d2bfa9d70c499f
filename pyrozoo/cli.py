"""The ``pyrozoo`` command: ``train``, ``compare``, ``plot``, ``prune``, ``export`` and ``info``."""

from __future__ import annotations

import argparse
import ast
import os
import sys

from pyrozoo import data as datasets
from pyrozoo.baselines import BASELINES
from pyrozoo.bmr import REDUCTIONS
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import GUIDES
from pyrozoo.methods import METHODS
from pyrozoo.nets import NETS
from pyrozoo.optim import OPTIMIZERS

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
METRIC_NAMES = ["accuracy", "nll", "ece", "ece15", "brier", "lpd"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, as for every other user error
        raise PyrozooError(f"{self.prog}: {message}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _choice(known):
    def check(text: str) -> str:
        if text not in known:
            raise argparse.ArgumentTypeError(f"unknown name {text!r}; choose from {', '.join(known)}")
        return text

    return check


def _net_option(text: str) -> dict:
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return {key: ast.literal_eval(value)}
    except (ValueError, SyntaxError):
        return {key: value}  # a bare word such as tiny


class _MergeOptions(argparse.Action):
    """Merges repeated ``KEY=VALUE`` options into one dict."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, {**(current if isinstance(current, dict) else {}), **values})


def _add_run_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """The options of one training run, shared by ``train`` and ``compare``. Without ``defaults`` an option
    that is not given is left out of the parsed arguments, so that a grid's config file can supply it."""

    def add(*flags, default=None, **kwargs):
        parser.add_argument(*flags, default=default if defaults else argparse.SUPPRESS, **kwargs)

    add("--data-dir", help="folder holding the dataset's files")
    add("--guide", type=_choice(list(GUIDES)), help="override the method's guide")
    add(
        "--epochs",
        type=_positive_int,
        help="epochs (default 50; with --resume, the run's own unless given)",
    )
    add("--steps-per-epoch", type=_positive_int, default=500)
    add("--batch-size", type=_positive_int, default=120)
    add("--lr", type=_positive_float, help="learning rate (default: the method's)")
    add(
        "--optimizer",
        type=_choice(list(OPTIMIZERS)),
        help="adam or adabelief, the reference's optimiser (default: the method's, adam)",
    )
    add("--samples", type=_positive_int, help="posterior samples per evaluation (default: 100; 1 for MAP)")
    add(
        "--dropout",
        type=float,
        help="dropout after hidden layers (default: the method's, 0.2 for flat-map, else 0)",
    )
    add(
        "--hidden-scale",
        type=_positive_float,
        help="flat prior: hidden layers' scale relative to the output layer's (0.1)",
    )
    add("--tau0", type=_positive_float, help="tiered prior: global scale (1e-2)")
    add(
        "--local-scales", action="store_true", default=False, help="tiered prior: add per-weight local scales"
    )
    add(
        "--count-pruned",
        action="store_true",
        default=False,
        help="spike-and-slab: count pruned weights as excluded in a layer's inclusion estimate "
        "(prunes much harder than the paper's rule)",
    )
    add(
        "--prune-units",
        action="store_true",
        default=False,
        help="BMR methods: after each per-weight pass, remove whole units (neurons, channels, attention heads) "
        "whose removal raises the evidence",
    )
    add(
        "--net-option",
        dest="net_options",
        type=_net_option,
        action=_MergeOptions,
        metavar="KEY=VALUE",
        help="a net size or option, repeatable: --net-option preset=tiny --net-option depth=2 (values are "
        "Python literals, else strings)",
    )
    add(
        "--warmup-steps",
        type=int,
        help="SVI steps before the first BMR pass (default: the method's, 500 for bmr-ss)",
    )
    add("--eval-every", type=_positive_int, default=1, help="evaluate every N epochs (and the last)")
    add("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pyrozoo", description="Bayesian sparsification of deep networks with Pyro and BMR."
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a Bayesian net by SVI into a run folder")
    train.add_argument("--net", type=_choice(list(NETS)), default="lenet")
    train.add_argument(
        "--data",
        type=_choice(list(datasets.DATASETS)),
        default=None,
        help="dataset (default: fashion-mnist, or the bundled fashion-mnist-mini if it is missing)",
    )
    train.add_argument("--method", type=_choice(list(METHODS)), default="flat-ff")
    _add_run_options(train)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default=None, help="run folder (default: runs/NET-METHOD-DATA-sSEED)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")

    compare = sub.add_parser(
        "compare",
        help="train a grid of nets x methods x datasets x seeds into one folder (resumable); tidy results.csv, "
        "a summary table and plots",
    )
    compare.add_argument(
        "--config", help="grid config file (TOML, see experiments/grid-*.toml); flags override it"
    )
    compare.add_argument("--nets", nargs="+", type=_choice(list(NETS)), default=argparse.SUPPRESS)
    compare.add_argument(
        "--methods",
        nargs="+",
        type=_choice([*METHODS, *BASELINES]),
        default=argparse.SUPPRESS,
        help="training methods, and baselines: magnitude (-ft) prunes the flat-map net by global magnitude to "
        "the sparsity bmr-ss reached (then fine-tunes it), magnitude-layer (-ft) each layer to that fraction",
    )
    compare.add_argument(
        "--data",
        nargs="+",
        type=_choice(list(datasets.DATASETS)),
        default=argparse.SUPPRESS,
        help="datasets (default: fashion-mnist)",
    )
    compare.add_argument("--seeds", nargs="+", type=int, default=argparse.SUPPRESS, help="seeds (default: 0)")
    compare.add_argument(
        "--finetune-steps",
        type=int,
        default=argparse.SUPPRESS,
        help="magnitude-ft: Adam steps of fine-tuning after pruning, at the flat-map run's lr and batch (500)",
    )
    compare.add_argument("--out", default=argparse.SUPPRESS, help="grid folder (default: runs/grid)")
    compare.add_argument(
        "--no-plots", action="store_true", help="skip the figures (pyrozoo plot DIR draws them)"
    )
    _add_run_options(compare, defaults=False)

    plot = sub.add_parser(
        "plot", help="redraw a grid folder's figures from its results.csv (and run folders)"
    )
    plot.add_argument("grid", help="grid folder written by pyrozoo compare")

    prune = sub.add_parser("prune", help="one-shot BMR of a finished mean-field run (writes RUN/pruned.pt)")
    prune.add_argument("run", help="run folder")
    prune.add_argument(
        "--rule",
        type=_choice([*REDUCTIONS, "shrinkage"]),
        default="spike-and-slab",
        help="a per-weight BMR rule, 'units' (structured BMR: whole neurons, channels and attention heads), "
        "'horseshoe' (BMR-RHS), or 'shrinkage': prune rows whose posterior-mean prior scale is below --threshold",
    )
    prune.add_argument(
        "--margin", type=float, default=0.0, help="threshold and units rules: prune iff dF > margin"
    )
    prune.add_argument(
        "--threshold", type=_positive_float, default=None, help="shrinkage rule: the scale cut-off"
    )
    prune.add_argument(
        "--count-pruned",
        action="store_true",
        help="spike-and-slab rule: count pruned weights as excluded in a layer's inclusion estimate",
    )

    export = sub.add_parser(
        "export", help="rebuild the run's sparse net, save it, compare it with the dense one"
    )
    export.add_argument("run", help="run folder (its pruned.pt is used when there is one)")
    export.add_argument("--repeats", type=_positive_int, default=50, help="timed forward passes per latency")

    sub.add_parser("info", help="list nets, methods, guides and datasets, and where each dataset was found")
    return parser


def _train(args) -> None:
    from pyrozoo.compare import train_config
    from pyrozoo.train import Run

    log = lambda text: print(text, file=sys.stderr)  # noqa: E731
    out = args.out or os.path.join("runs", f"{args.net}-{args.method}-{args.data or 'default'}-s{args.seed}")
    if args.resume:
        run = Run.open(out, epochs=args.epochs, log=log)
    else:
        options = {**vars(args), "epochs": args.epochs or 50}
        run = Run(train_config(args.net, args.method, args.data, args.seed, options), out, log=log)
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
    tmp = grid.out / (TABLE + ".tmp")
    tmp.write_text(summary)
    os.replace(tmp, grid.out / TABLE)
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
    from pyrozoo.bmr import reduce
    from pyrozoo.bmr.prune import posterior_scales, prune, scale_table, shrinkage_scores
    from pyrozoo.train import Run

    if args.count_pruned and args.rule != "spike-and-slab":
        raise PyrozooError("--count-pruned belongs to the spike-and-slab rule")
    if args.rule == "shrinkage" and args.threshold is None:
        raise PyrozooError(
            "--rule shrinkage needs --threshold T (prune rows whose posterior-mean scale is below T)"
        )
    run = Run.open(args.run, log=lambda text: print(text, file=sys.stderr))
    before = run.evaluate()
    if args.rule == "shrinkage":
        scales = posterior_scales(run.model, run.guide)
        print(scale_table(scales).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
        report = prune(
            run.model,
            run.guide,
            "threshold",
            scores=shrinkage_scores(run.model, scales),
            margin=-args.threshold,
        )
    elif args.rule in ("threshold", "units"):
        report = reduce(run.model, run.guide, args.rule, margin=args.margin)
    else:
        report = reduce(
            run.model, run.guide, args.rule, **({"count_pruned": True} if args.count_pruned else {})
        )
    after = run.evaluate()
    run.save_pruned(report, after)
    print(
        f"pruning ({args.rule}) of {run.out} after epoch {run.epoch}: {report.seconds * 1e3:.1f} ms, "
        f"pruned fraction {report.pruned_fraction:.4f}; state written to {run.out / 'pruned.pt'}"
    )
    print(report.table().to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(_table({"before": before, "after": after}))


def _export(args) -> None:
    from pyrozoo.export import export
    from pyrozoo.train import PRUNED, Run

    run = Run.open(args.run, log=lambda text: print(text, file=sys.stderr))
    state = "checkpoint"
    if (run.out / PRUNED).exists():
        run.load_pruned()
        state = PRUNED
    summary = export(run, run.out / "export", repeats=args.repeats)
    print(
        f"{run.out} ({state}, epoch {run.epoch}) exported to {run.out / 'export'}: sparse_state_dict.pt, "
        f"sparse.pt2 (torch.export); CPU, {summary['threads']} threads"
    )
    print(_table({k: summary[k] for k in ("dense", "sparse")}))
    print(
        f"parameters {summary['parameter_ratio']:.1f}x fewer ({summary['nonzero_ratio']:.1f}x fewer non-zero), "
        f"batch-256 latency {summary['speedup_batch256']:.1f}x lower"
    )


def _info() -> None:
    print("nets:")
    for entry in NETS.values():
        print(f"  {entry.name:20s} {entry.description}")
    print("methods:")
    for method in METHODS.values():
        print(
            f"  {method.name:20s} {method.description} (guide {method.guide}, {method.optimizer} lr {method.lr})"
        )
    print("guides:")
    for name, cls in GUIDES.items():
        print(f"  {name:20s} {(cls.__doc__ or '').strip().splitlines()[0]}")
    print("datasets:")
    for info in datasets.DATASETS.values():
        where = datasets.locate(info.name)
        print(
            f"  {info.name:20s} {info.description}; {'found in ' + where if where else 'not found locally'}"
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
