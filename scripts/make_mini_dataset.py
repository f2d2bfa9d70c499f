"""Regenerate pyrozoo/datasets/fashion-mnist-mini.npz from the full Fashion-MNIST (by default Debian's copy).

The subset: the first 400 images of each class of the training set and the first 100 of each class of the
test set, in their original order, uint8 (N, 28, 28), saved with np.savez_compressed.
Run from the repository root: python -m scripts.make_mini_dataset [--source DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pyrozoo.data import DEBIAN_FASHION_MNIST, MINI_FILE, load


def first_per_class(y: np.ndarray, per_class: int, num_classes: int) -> np.ndarray:
    """Indices of the first `per_class` examples of every class, in dataset order."""
    picks = [np.flatnonzero(y == k)[:per_class] for k in range(num_classes)]
    if any(len(p) < per_class for p in picks):
        raise SystemExit(f"fewer than {per_class} examples of some class")
    return np.sort(np.concatenate(picks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default=DEBIAN_FASHION_MNIST, help="folder with the four IDX files")
    parser.add_argument("--out", default=str(Path(__file__).parents[1] / "pyrozoo" / "datasets" / MINI_FILE))
    parser.add_argument("--train-per-class", type=int, default=400)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args()

    raw = load("fashion-mnist", data_dir=args.source, download=False)
    # load() falls back to $PYROZOO_DATA and the cache; the subset must come from --source itself.
    if Path(raw.source).resolve() != Path(args.source).resolve():
        raise SystemExit(f"Fashion-MNIST not found in {args.source} (found {raw.source} instead)")
    y_train, y_test = raw.y_train.numpy(), raw.y_test.numpy()
    train = first_per_class(y_train, args.train_per_class, raw.num_classes)
    test = first_per_class(y_test, args.test_per_class, raw.num_classes)
    np.savez_compressed(
        args.out,
        x_train=raw.x_train.numpy()[train, 0],
        y_train=y_train[train].astype(np.uint8),
        x_test=raw.x_test.numpy()[test, 0],
        y_test=y_test[test].astype(np.uint8),
    )
    print(f"wrote {args.out}: {len(train)} training and {len(test)} test images from {raw.source}")


if __name__ == "__main__":
    main()
