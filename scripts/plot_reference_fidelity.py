"""The fidelity figure: the reference code's BMR-S&S trajectory beside pyrozoo's, per net.

    python scripts/plot_reference_fidelity.py REFERENCE.csv RUN [RUN ...] --out FIGURE.png
    python scripts/plot_reference_fidelity.py REF_A.csv REF_B.csv RUN [RUN ...] --references 2 --out FIGURE.png

Each REFERENCE.csv (the first --references arguments, one by default; black, one line style per seed) is a
per-epoch trajectory in the layout of experiments/reference/reference-lenet-bmr-ss-seed137.csv (columns
epoch, pruned_fraction, accuracy, pruned_layerK); each RUN is a pyrozoo run folder (metrics.csv, bmr.csv). Panels:
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
    parser.add_argument("paths", type=Path, nargs="+", help="the reference CSVs, then the pyrozoo run folders")
    parser.add_argument("--references", type=int, default=1, help="how many of the paths are reference CSVs")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: folder names)")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    references, run_folders = args.paths[: args.references], args.paths[args.references :]
    if not run_folders:
        parser.error("give at least one pyrozoo run folder after the reference CSVs")
    runs = [run_curves(folder) for folder in run_folders]
    labels = args.labels or [folder.name for folder in run_folders]
    if len(labels) != len(run_folders):
        parser.error(f"give one label per run folder: {len(labels)} labels for {len(run_folders)} runs")
    layers = list(runs[0][1].columns)
    panels = 2 + len(layers)
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.0), squeeze=False)
    axes = axes[0]
    for path, style in zip(references, ["-", "--", ":", "-."]):
        reference = pd.read_csv(path)
        label = f"reference ({path.stem})"
        layer_columns = [c for c in reference if c.startswith("pruned_layer")]
        evaluated = reference.dropna(subset=["accuracy"])
        axes[0].plot(reference["epoch"], reference["pruned_fraction"], "k" + style, lw=2, label=label)
        axes[1].plot(evaluated["epoch"], evaluated["accuracy"], "ko" + style, lw=2, label=label)
        for k, layer in enumerate(layers[: len(layer_columns)]):
            axes[2 + k].plot(reference["epoch"], reference[layer_columns[k]], "k" + style, lw=2, label=label)
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
