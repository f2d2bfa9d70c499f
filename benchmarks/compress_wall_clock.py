"""``pyrozoo compress``'s wall clock against Torch-Pruning plus its fine-tune (issue 28 asks for at most twice),
paired in one process: ``--rounds`` calls of :func:`pyrozoo.compress` with one baseline, each timing pyrozoo's
method (its Laplace fits, ranking, latency search, rebuild and fine-tune) and then the baseline's (its own
latency search and the same fine-tune) on the same machine minutes apart. It prints each round's seconds and
ratio, the machine's load beside them, and the median ratio:

    python benchmarks/bn_cnn.py --epochs 2 --out bn_cnn.pt     # the trained BatchNorm CNN of issue 28
    PYTHONPATH=benchmarks python benchmarks/compress_wall_clock.py bn_cnn:bn_cnn --weights bn_cnn.pt --rounds 3

Loading the data and the net, the dense net's rows and the report's closing latencies are common to both and
left out of both (they are what the report's ``seconds`` leave out).
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

import pyrozoo
from pyrozoo import data as datasets
from pyrozoo import pruners
from pyrozoo.compress import load_trained_net


def _load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("net", help="as pyrozoo compress takes it (a pyrozoo net, tv:NAME, module:factory)")
    parser.add_argument("--weights", required=True, help="the trained state_dict")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--pad-to", type=int, default=32)
    parser.add_argument("--target", default="latency=0.5")
    parser.add_argument("--baseline", choices=pruners.PRUNERS, default="tp-l1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=21, help="timed rounds per latency ratio")
    parser.add_argument("--finetune-steps", type=int, default=300, help="compress's fine-tune, for every method")
    parser.add_argument("--fit-size", type=int, default=2000, help="training inputs of the Laplace fit")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1 or args.finetune_steps < 0 or args.fit_size < 1:
        parser.error("--rounds, --repeats and --fit-size are at least 1, --finetune-steps at least 0")
    torch.set_num_threads(1)  # every method's work on one thread alike (the command times on one by default)
    d = datasets.prepare(datasets.load(args.data), pad_to=args.pad_to)
    net = load_trained_net(args.net, args.weights, d)
    ratios = []
    for seed in range(args.rounds):
        load = _load()
        result = pyrozoo.compress(
            net, d, args.target, baselines=(args.baseline,), repeats=args.repeats, seed=seed, progress=False,
            finetune_steps=args.finetune_steps, fit_size=args.fit_size, log=lambda text: None,
        )  # fmt: skip
        seconds = {row["method"]: row["seconds"] for row in result.table if "seconds" in row}
        ratios.append(seconds["pyrozoo"] / seconds[args.baseline])
        print(
            f"round {seed}: pyrozoo {seconds['pyrozoo']:.0f} s, {args.baseline} {seconds[args.baseline]:.0f} s, "
            f"ratio {ratios[-1]:.2f} (load {load} -> {_load()})",
            flush=True,
        )
    print(f"median ratio {statistics.median(ratios):.2f} over {args.rounds} rounds")


if __name__ == "__main__":
    main()
