"""Training with and without compaction: seconds per epoch against epoch (the figure), and the numbers that
say what compaction saved: total training seconds, epoch time once >= 95% pruned against epoch 1, and final
accuracy and ECE.

python scripts/compaction_figure.py COMPACTED_RUN UNCOMPACTED_RUN --out FOLDER [--stem NAME]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pyrozoo.plots import epoch_seconds, plot_epoch_times
from pyrozoo.runfolder import committed_metrics

PRUNED = 0.95


def summary(label: str, metrics) -> dict:
    seconds = epoch_seconds(metrics)
    pruned = metrics.set_index("epoch").pruned_fraction
    after = seconds[pruned[pruned >= PRUNED].index[1:]] if (pruned >= PRUNED).any() else seconds[[]]
    final = metrics.dropna(subset=["accuracy"]).iloc[-1] if "accuracy" in metrics else None
    return {
        "run": label,
        "epochs": len(seconds),
        "training_seconds": float(seconds.sum()),
        "epoch1_seconds": float(seconds.iloc[0]),
        f"first_epoch_at_{PRUNED}": int(pruned[pruned >= PRUNED].index[0]) if len(after) else None,
        f"epoch_after_{PRUNED}_over_epoch1_median": (
            float(after.median() / seconds.iloc[0]) if len(after) else None
        ),
        f"epoch_after_{PRUNED}_over_epoch1_max": float(after.max() / seconds.iloc[0]) if len(after) else None,
        "final_pruned": float(pruned.iloc[-1]),
        "final_accuracy": None if final is None else float(final.accuracy),
        "final_ece": None if final is None else float(final.ece),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("compacted")
    parser.add_argument("uncompacted")
    parser.add_argument("--out", required=True)
    parser.add_argument("--stem", default="compaction-epoch-seconds")
    args = parser.parse_args()
    runs = {
        "compacted": committed_metrics(args.compacted),
        "uncompacted (--no-compact)": committed_metrics(args.uncompacted),
    }
    rows = [summary(label, metrics) for label, metrics in runs.items()]
    for row in rows:
        print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    a, b = rows
    print(f"training seconds, compacted / uncompacted: {a['training_seconds'] / b['training_seconds']:.3f}")
    if a["final_accuracy"] is not None and b["final_accuracy"] is not None:
        print(
            f"final accuracy {a['final_accuracy']:.4f} / {b['final_accuracy']:.4f} "
            f"(difference {100 * (a['final_accuracy'] - b['final_accuracy']):+.2f} points), ECE "
            f"{a['final_ece']:.4f} / {b['final_ece']:.4f} ({100 * (a['final_ece'] - b['final_ece']):+.2f} points)"
        )
    for path in plot_epoch_times(runs, Path(args.out), args.stem):
        print(path)


if __name__ == "__main__":
    main()
