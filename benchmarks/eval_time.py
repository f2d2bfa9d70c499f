"""Time of the test evaluation (``pyrozoo.train.evaluate``) with posterior samples run through the net one at a
time and several at once (``samples_at_once``: vmap over their stacked weights), as ratios measured in the same
process, the candidates timed round-robin in a shuffled order (step_time's timer), each as its time over one-at-a-time's
in the same round, median [IQR]. Each candidate draws the same samples from the same seed.

    python benchmarks/eval_time.py [--nets mlp lenet] [--points 2000] [--samples 8] [--at-once 4 8]
        [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform

import pyro
import torch

from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.nets import NETS, create_net
from pyrozoo.evaluation import evaluate

from step_time import print_ratios, timed

CLASSES = 10


def bench_net(name: str, args) -> None:
    side = NETS[name].pad_to or 28
    model = BayesianModel(create_net(name, in_channels=1, image_size=side, num_classes=CLASSES))
    guide = make_guide("meanfield", model)
    x, y = torch.randn(args.points, 1, side, side), torch.randint(0, CLASSES, (args.points,))

    def candidate(at_once: int):
        def run():
            torch.manual_seed(0)
            evaluate(model, guide, x, y, CLASSES, args.samples, args.batch_size, samples_at_once=at_once)

        return run

    steps = {f"samples at once {k}": candidate(k) for k in [1, *args.at_once]}
    print_ratios(name, timed(steps, args.repeats, warmup=1), {"one at a time": "samples at once 1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", default=["mlp", "lenet"])
    parser.add_argument("--points", type=int, default=2000, help="test points (random images)")
    parser.add_argument("--samples", type=int, default=8, help="posterior samples per evaluation")
    parser.add_argument(
        "--batch-size", type=int, default=2000, help="test points per batch (as eval_batch_size)"
    )
    parser.add_argument("--at-once", type=int, nargs="+", default=[4, 8], help="samples run together")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed rounds (one of each candidate per round)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# {args.points} points, {args.samples} samples, batch {args.batch_size}, CPU, {torch.get_num_threads()} "
        f"threads, torch {torch.__version__}, pyro {pyro.__version__}, {platform.processor() or platform.machine()}"
    )
    for name in args.nets:
        bench_net(name, args)


if __name__ == "__main__":
    main()
