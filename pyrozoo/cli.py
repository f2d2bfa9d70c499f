"""The ``pyrozoo`` command: ``train`` and ``info``."""

from __future__ import annotations

import argparse
import os
import sys

from pyrozoo import data as datasets
from pyrozoo.bmr import REDUCTIONS
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import GUIDES
from pyrozoo.methods import METHODS
from pyrozoo.nets import NETS

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
    train.add_argument("--data-dir", default=None, help="folder holding the dataset's files")
    train.add_argument("--method", type=_choice(list(METHODS)), default="flat-ff")
    train.add_argument(
        "--guide", type=_choice(list(GUIDES)), default=None, help="override the method's guide"
    )
    train.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        help="epochs (default 50; with --resume, the run's own unless given)",
    )
    train.add_argument("--steps-per-epoch", type=_positive_int, default=500)
    train.add_argument("--batch-size", type=_positive_int, default=120)
    train.add_argument(
        "--lr", type=_positive_float, default=None, help="learning rate (default: the method's)"
    )
    train.add_argument(
        "--samples",
        type=_positive_int,
        default=None,
        help="posterior samples per evaluation (default: 100; 1 for MAP)",
    )
    train.add_argument(
        "--dropout",
        type=float,
        default=None,
        help="dropout after hidden layers (default: the method's, 0.2 for flat-map, else 0)",
    )
    train.add_argument(
        "--hidden-scale",
        type=_positive_float,
        default=None,
        help="flat prior: hidden layers' scale relative to the output layer's (0.1)",
    )
    train.add_argument("--tau0", type=_positive_float, default=None, help="tiered prior: global scale (1e-2)")
    train.add_argument(
        "--local-scales", action="store_true", help="tiered prior: add per-weight local scales"
    )
    train.add_argument(
        "--count-pruned",
        action="store_true",
        help="spike-and-slab: count pruned weights as excluded in a layer's inclusion estimate "
        "(prunes much harder than the paper's rule)",
    )
    train.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="SVI steps before the first BMR pass (default: the method's, 500 for bmr-ss)",
    )
    train.add_argument(
        "--eval-every", type=_positive_int, default=1, help="evaluate every N epochs (and the last)"
    )
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--out", default=None, help="run folder (default: runs/NET-METHOD-DATA-sSEED)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")

    prune = sub.add_parser("prune", help="one-shot BMR of a finished mean-field run (writes RUN/pruned.pt)")
    prune.add_argument("run", help="run folder")
    prune.add_argument(
        "--rule",
        type=_choice([*REDUCTIONS, "shrinkage"]),
        default="spike-and-slab",
        help="a BMR rule, 'horseshoe' (BMR-RHS), or 'shrinkage': prune rows whose posterior-mean "
        "prior scale is below --threshold",
    )
    prune.add_argument("--margin", type=float, default=0.0, help="threshold rule: prune iff dF > margin")
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


def _prior_options(args) -> dict:
    tiered = {"tau0": args.tau0} if args.tau0 is not None else {}
    if args.local_scales:
        tiered["local"] = True
    if tiered and METHODS[args.method].prior.__name__ != "tiered":
        raise PyrozooError("--tau0 and --local-scales belong to the tiered prior (--method tiered-ff)")
    if args.hidden_scale is None:
        return tiered
    if METHODS[args.method].prior.__name__ != "flat":
        raise PyrozooError("--hidden-scale belongs to the flat prior (flat-map, flat-ff, bmr-ss, bmr-rhs)")
    return {"hidden_scale": args.hidden_scale}


def _rule_options(args) -> dict:
    if not args.count_pruned:
        return {}
    if METHODS[args.method].rule != "spike-and-slab":
        raise PyrozooError("--count-pruned belongs to the spike-and-slab rule (--method bmr-ss)")
    return {"count_pruned": True}


def _train(args) -> None:
    from pyrozoo.train import Run, TrainConfig

    log = lambda text: print(text, file=sys.stderr)  # noqa: E731
    out = args.out or os.path.join("runs", f"{args.net}-{args.method}-{args.data or 'default'}-s{args.seed}")
    if args.resume:
        run = Run.open(out, epochs=args.epochs, log=log)
    else:
        config = TrainConfig(
            net=args.net,
            data=args.data,
            data_dir=args.data_dir,
            method=args.method,
            guide=args.guide,
            epochs=args.epochs or 50,
            steps_per_epoch=args.steps_per_epoch,
            batch_size=args.batch_size,
            lr=args.lr,
            samples=args.samples,
            warmup_steps=args.warmup_steps,
            eval_every=args.eval_every,
            device=args.device,
            seed=args.seed,
            net_options={} if args.dropout is None else {"dropout": args.dropout},
            prior_options=_prior_options(args),
            rule_options=_rule_options(args),
        )
        run = Run(config, out, log=log)
    c = run.config
    print(
        f"training {c.net} with {c.method} (guide {c.guide}, lr {c.lr}) on {c.data} from {run.data.source}; "
        f"{c.epochs} epochs x {c.steps_per_epoch} steps, batch {c.batch_size}, {c.device}; run folder {run.out}",
        file=sys.stderr,
    )
    table = run.train(progress=not args.no_progress)
    evaluated = table.dropna(subset=["accuracy"]) if "accuracy" in table else table
    columns = [col for col in SUMMARY_COLUMNS if col in evaluated]
    print(f"\n{c.net} {c.method} on {c.data}: metrics per evaluated epoch (seconds = training time so far)")
    print(evaluated[columns].to_string(index=False, float_format=lambda v: f"{v:.4f}"))


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
    elif args.rule == "threshold":
        report = prune(run.model, run.guide, "threshold", margin=args.margin)
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
        print(f"  {method.name:20s} {method.description} (guide {method.guide}, lr {method.lr})")
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
        {"train": _train, "prune": _prune, "export": _export, "info": lambda _: _info()}[args.command](args)
    except PyrozooError as e:
        print(f"pyrozoo: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(
            "pyrozoo: interrupted; a killed run continues with --resume from its last finished epoch",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
