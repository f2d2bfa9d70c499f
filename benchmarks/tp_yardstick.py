"""Torch-Pruning plus its fine-tune, alone: the yardstick for ``pyrozoo compress``'s wall clock (issue 28 asks
for at most twice this). One Torch-Pruning pruner brings a trained net to a fraction of its dense CPU latency
(batch 256, as ``compress`` reads a latency target: the least pruned net at or below it, the ratio bisected)
and the pruned net gets ``compress``'s fine-tune; it prints the pruned net's test accuracy and latency. Time
the whole command beside ``compress`` with that one target and no baselines, in turns:

    PYTHONPATH=benchmarks python benchmarks/tp_yardstick.py bn_cnn:bn_cnn --weights bn_cnn.pt --latency 0.5
    PYTHONPATH=benchmarks pyrozoo compress bn_cnn:bn_cnn --weights bn_cnn.pt --pad-to 32 --target latency=0.5 \\
        --baselines

``compress`` does more than pyrozoo's own pruning in that time (the dense net's row and its fine-tuned copy,
and the table's closing round-robin of latencies), so the ratio of the two overstates what pyrozoo costs.
"""

from __future__ import annotations

import argparse
import time

import torch

from pyrozoo import costs, pruners
from pyrozoo import data as datasets
from pyrozoo.baselines import finetune
from pyrozoo.compress import load_trained_net
from pyrozoo.metrics import evaluate_net


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("net", help="as pyrozoo compress takes it (a pyrozoo net, tv:NAME, module:factory)")
    parser.add_argument("--weights", required=True, help="the trained state_dict")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--pad-to", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.5, help="fraction of the dense latency, in (0, 1)")
    parser.add_argument(
        "--pruner", choices=[p for p in pruners.PRUNERS if p != "global-magnitude"], default="tp-l1"
    )
    parser.add_argument("--finetune-steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=21, help="timed rounds per latency ratio")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 0 < args.latency < 1:
        parser.error(f"--latency is a fraction of the dense latency in (0, 1), not {args.latency}")
    if args.finetune_steps < 0 or args.repeats < 1:
        parser.error("--finetune-steps is at least 0 and --repeats at least 1")
    torch.set_num_threads(1)
    start = time.perf_counter()
    d = datasets.prepare(datasets.load(args.data), pad_to=args.pad_to)
    dense = load_trained_net(args.net, args.weights, d)
    head = [m for m in dense.modules() if isinstance(m, torch.nn.Linear)][-1]
    example = d.x_test[:256]
    measure = lambda net: costs.cost("latency", net, dense, example, args.repeats)  # noqa: E731
    batch = (d.x_train[:128], d.y_train[:128])
    small, ratio = pruners.channel_prune_to(
        dense, d.x_test[:1], args.pruner, [head], measure, args.latency, batch
    )
    finetune(small, d.x_train, d.y_train, args.finetune_steps, 1e-3, 128, args.seed, schedule="cosine")
    accuracy = evaluate_net(small, d.x_test, d.y_test, d.num_classes)["accuracy"]
    print(
        f"{args.pruner}: {costs.parameters(small):,} parameters, {ratio:.3f} of the dense latency, accuracy "
        f"{accuracy:.4f}, {time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
