"""The predictive mean and bands of finished 1-D regression runs (e.g. toy1d), one figure per run.

python scripts/regression_figure.py RUN [RUN ...] --out experiments/regression [--samples 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pyrozoo.plots import plot_regression_bands
from pyrozoo.train import Run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for folder in args.runs:
        with Run.open(folder, log=lambda _: None) as run:
            stem = Path(args.out) / f"bands-{run.config.data}-{run.config.method}"
            for path in plot_regression_bands(run, stem, args.samples):
                print(path)


if __name__ == "__main__":
    main()
