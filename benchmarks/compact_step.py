"""A compacted run's training step against the same state uncompacted, timed round-robin in one process.

Opens a run folder whose checkpoint is compacted (``pyrozoo train`` with a BMR method), grows a copy of its model
and guide back to the original shapes (:func:`pyrozoo.bmr.compact.expand`: removed entries pruned, at the prior),
and times one SVI step (Adam, the run's batch size) of each, alternating, so that the machine's load affects both
alike. Prints the medians and their ratio.

    python benchmarks/compact_step.py RUN_FOLDER [--rounds 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch

from pyrozoo.bmr.compact import expand
from pyrozoo.steps import svi_step
from pyrozoo.train import Run


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
        times = {k: [] for k in setups}
        with pyro.validation_enabled(False):
            for r in range(args.rounds + 10):
                for key, (model, guide) in setups.items():
                    start = time.perf_counter()
                    svi_step(model, guide, optimizers[key], x, y, n)
                    if r >= 10:  # warm-up rounds are not counted
                        times[key].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(
        f"run {args.run}, epoch {run.epoch}, batch {len(x)}, {args.threads} thread(s), {args.rounds} rounds"
    )
    for key in setups:
        print(f"{key:12s} latent entries {sizes[key]:>9,d}  median step {medians[key]:.2f} ms")
    print(f"compacted / uncompacted step time: {medians['compacted'] / medians['uncompacted']:.3f}")


if __name__ == "__main__":
    main()
