"""A compacted run's training step against the same state uncompacted, timed round-robin in one process.

Opens a run folder whose checkpoint is compacted (``pyrozoo train`` with a BMR method), grows a copy of its model
and guide back to the original shapes (:func:`pyrozoo.bmr.compact.expand`: removed entries pruned, at the prior),
and times one SVI step (Adam, the run's batch size) of each, round-robin in a shuffled order (step_time's
timer), so that the machine's load affects both alike. Prints the compacted step's time over the uncompacted one's
in the same round, median [IQR].

    python benchmarks/compact_step.py RUN_FOLDER [--rounds 200] [--threads 1]
"""

from __future__ import annotations

import argparse

import torch

from pyrozoo.bmr.compact import expand
from pyrozoo.steps import svi_step
from pyrozoo.train import Run
from step_time import print_ratios, timed  # benchmarks/ is on the path when run as a script


def run_arguments(doc: str, rounds: str) -> argparse.Namespace:
    """The command line of a benchmark of one finished run: its folder, the timed ``rounds`` (200 by default)
    and the CPU threads (1), which it sets."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument(rounds, type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    args = run_arguments(__doc__, "--rounds")
    with Run.open(args.run, log=lambda text: None) as run:
        if not run.model.kept:
            raise SystemExit(f"{args.run} is not compacted")
        x, y = run.data.x_train[: run.config.batch_size], run.data.y_train[: run.config.batch_size]
        n = len(run.data.x_train)
        setups = {"compacted": (run.model, run.guide)}
        setups["uncompacted"] = expand(run.model, run.guide)
        optimizers = {k: torch.optim.Adam(g.parameters(), lr=1e-3) for k, (m, g) in setups.items()}
        sizes = {k: sum(layer.shape.numel() for layer in m.layers) for k, (m, g) in setups.items()}
        steps = {
            key: (lambda m=m, g=g, key=key: svi_step(m, g, optimizers[key], x, y, n))
            for key, (m, g) in setups.items()
        }
        times = timed(steps, args.rounds, warmup=10)
    print(
        f"run {args.run}, epoch {run.epoch}, batch {len(x)}, {args.threads} thread(s), {args.rounds} rounds"
    )
    for key in setups:
        print(f"{key:12s} latent entries {sizes[key]:>9,d}")
    print_ratios("step", times, {"uncompacted": "uncompacted"})


if __name__ == "__main__":
    main()
