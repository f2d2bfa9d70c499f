"""Issue 20's figure: the reference code's BMR-S&S trajectory beside pyrozoo's, per net.

    python experiments/reference/plot_fidelity.py REFERENCE.csv RUN [RUN ...] --out FIGURE.png

REFERENCE.csv is a per-epoch trajectory in the layout of shared/reference/lenet-bmr-ss.csv (columns epoch,
pruned_fraction, accuracy, pruned_layerK); each RUN is a pyrozoo run folder (metrics.csv, bmr.csv). Panels:
overall pruned fraction, test accuracy, and each layer's pruned fraction, against epoch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def run_curves(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    metrics = pd.read_csv(folder / "metrics.csv")
    passes = pd.read_csv(folder / "bmr.csv")
    passes["pruned"] = 1 - passes["kept"] / passes["size"]
    order = list(dict.fromkeys(passes["layer"]))  # the net's order, not the alphabet's
    return metrics, passes.pivot(index="epoch", columns="layer", values="pruned")[order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: folder names)")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    reference = pd.read_csv(args.reference)
    layer_columns = [c for c in reference if c.startswith("pruned_layer")]
    runs = [run_curves(folder) for folder in args.runs]
    labels = args.labels or [folder.name for folder in args.runs]
    layers = list(runs[0][1].columns)
    panels = 2 + len(layers)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.0), squeeze=False)
    axes = axes[0]
    evaluated = reference.dropna(subset=["accuracy"])
    axes[0].plot(reference["epoch"], reference["pruned_fraction"], "k-", lw=2, label="reference")
    axes[1].plot(evaluated["epoch"], evaluated["accuracy"], "ko-", lw=2, label="reference")
    for k, layer in enumerate(layers):
        if k < len(layer_columns):
            axes[2 + k].plot(reference["epoch"], reference[layer_columns[k]], "k-", lw=2, label="reference")
    for (metrics, per_layer), label in zip(runs, labels):
        axes[0].plot(metrics["epoch"], metrics["pruned_fraction"], label=label)
        shown = metrics.dropna(subset=["accuracy"])
        axes[1].plot(shown["epoch"], shown["accuracy"], "o-", ms=3, label=label)
        for k, layer in enumerate(layers):
            axes[2 + k].plot(per_layer.index, per_layer[layer], label=label)
    axes[0].set_title("pruned fraction")
    axes[1].set_title("test accuracy")
    for k, layer in enumerate(layers):
        axes[2 + k].set_title(f"layer {k} ({layer}) pruned")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(args.title)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
