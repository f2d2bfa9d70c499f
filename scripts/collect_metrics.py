"""Gather run folders' ``metrics.csv`` into one table with a ``run`` column (each folder's path as given): the
form in which ``experiments/`` keeps the per-epoch metrics behind RESULTS.md's tables, instead of one folder of
files per run.

    python scripts/collect_metrics.py RUN [RUN ...] --out experiments/run-metrics.csv
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def collect(folders: list[str]) -> pd.DataFrame:
    """Every row of every folder's metrics.csv, the folder's path first; columns a run lacks are empty."""
    tables = [pd.read_csv(Path(folder) / "metrics.csv").assign(run=folder) for folder in folders]
    table = pd.concat(tables, ignore_index=True)
    return table[["run", *[c for c in table.columns if c != "run"]]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run folders, each with a metrics.csv")
    parser.add_argument("--out", required=True, help="the CSV to write")
    args = parser.parse_args()
    collect(args.runs).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
