"""Datasets: find them (or download them), read them with our own IDX and CIFAR readers, standardise and pad.

Lookup order for every dataset but the bundled `fashion-mnist-mini`: the `data_dir` argument, `$PYROZOO_DATA`,
the cache (`$PYROZOO_CACHE`, else ~/.cache/pyrozoo), for Fashion-MNIST the Debian package folder, and last a
torchvision download into the cache. Each folder is tried in torchvision's layout and as a flat folder.

Every problem with a dataset file (a broken gzip or pickle, a bad IDX header, labels out of range, image and
label counts that differ, an empty split) is a PyrozooError that names the file and says what to do: the
readers decode bytes only inside :func:`_decoding`, and check the decoded arrays with :func:`_corrupt`.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import math
import os
import pickle
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pyrozoo.errors import PyrozooError
from pyrozoo.registry import Registry

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
MINI_FILE = "fashion-mnist-mini.npz"
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset before loading it."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    description: str
    task: str = "classify"  # or "regress": the likelihood and metrics a run on it uses


DATASETS = Registry("dataset")
for _entry in (
    DatasetInfo("fashion-mnist", 1, 28, 10, "Fashion-MNIST: 60000/10000 greyscale 28x28 images of clothing"),
    DatasetInfo("fashion-mnist-mini", 1, 28, 10, "bundled class-balanced Fashion-MNIST subset: 4000/1000"),
    DatasetInfo("mnist", 1, 28, 10, "MNIST: 60000/10000 greyscale 28x28 handwritten digits"),
    DatasetInfo("cifar10", 3, 32, 10, "CIFAR-10: 50000/10000 colour 32x32 images, 10 classes"),
    DatasetInfo("cifar100", 3, 32, 100, "CIFAR-100: 50000/10000 colour 32x32 images, 100 fine classes"),
    DatasetInfo(
        "toy1d",
        1,
        1,
        1,
        "synthetic 1-D regression: y = x sin x + heteroscedastic noise, inputs with a gap in (-1, 1); 600/600",
        "regress",
    ),
    DatasetInfo(
        "diabetes",
        10,
        1,
        1,
        "diabetes progression (scikit-learn's bundled copy; pip install 'pyrozoo[tabular]'): 10 features, "
        "442 patients, split 354/88",
        "regress",
    ),
    DatasetInfo(
        "digits",
        1,
        28,
        10,
        "handwritten digits (scikit-learn's bundled copy of the UCI set, 8x8 at 17 grey levels; pip install "
        "'pyrozoo[tabular]'), scaled up to MNIST's layout (a 20x20 box centred in 28x28, pixels 0..255): 1797 "
        "images, split 899/898",
    ),
):
    DATASETS.register(_entry.name, _entry)

# torchvision's class per dataset; for the MNIST-likes its name is also the folder of torchvision's layout.
_TORCHVISION = {
    "fashion-mnist": "FashionMNIST",
    "mnist": "MNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}
# CIFAR: folder inside the archive, training files, test files, label key.
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


@dataclass
class RawData:
    """A dataset as stored: uint8 images (N, C, H, W) or float features (N, D, 1, 1), int64 labels or float
    regression targets, and where it was found."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    source: str
    task: str = "classify"
    # a CSV table's feature column names (in the order of the features) and its target's class labels (class k
    # is labels[k]), so that new rows of the same table can be read by name; None for other datasets
    feature_names: tuple[str, ...] | None = None
    class_labels: tuple | None = None


@dataclass
class Prepared:
    """A dataset ready for training: standardised (and maybe padded) float32 images, int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: torch.Tensor
    std: torch.Tensor
    source: str
    name: str
    task: str = "classify"
    # regression: the training targets' mean and std; targets are standardised with them, and predictions and
    # metrics are mapped back to the original units (y = y_mean + y_std * standardised y)
    y_mean: float = 0.0
    y_std: float = 1.0


def cache_dir() -> Path:
    """Where downloads go: `$PYROZOO_CACHE`, else ~/.cache/pyrozoo."""
    return Path(os.environ.get("PYROZOO_CACHE") or Path.home() / ".cache" / "pyrozoo").expanduser()


def _info(name: str) -> DatasetInfo:
    return DATASETS[name]


def _search_dirs(name: str, data_dir: str | os.PathLike | None) -> list[tuple[str, Path]]:
    dirs = [] if data_dir is None else [("--data-dir", Path(data_dir).expanduser())]
    if os.environ.get("PYROZOO_DATA"):
        dirs.append(("$PYROZOO_DATA", Path(os.environ["PYROZOO_DATA"]).expanduser()))
    dirs.append(("cache", cache_dir()))
    if name == "fashion-mnist":
        dirs.append(("Debian package folder", Path(DEBIAN_FASHION_MNIST)))
    return dirs


def _idx_path(folder: Path, stem: str) -> Path | None:
    """The plain or the gzipped IDX file; torchvision keeps both, and the plain one reads faster."""
    return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


def _find_in(name: str, directory: Path) -> Path | None:
    """The folder under `directory` holding all files of `name`, trying torchvision's layout first."""
    if name in _CIFAR:
        folder, train, test, _ = _CIFAR[name]
        return next(
            (c for c in (directory / folder, directory) if all((c / f).is_file() for f in train + test)), None
        )
    candidates = (directory / _TORCHVISION[name] / "raw", directory)
    return next((c for c in candidates if all(_idx_path(c, stem) for stem in IDX_FILES)), None)


def locate(name: str, data_dir: str | os.PathLike | None = None) -> str | None:
    """Where `load(name, data_dir)` would read the dataset from without downloading; None if nowhere."""
    if is_table(name):
        return name if Path(name).is_file() else None
    _info(name)
    if name == "fashion-mnist-mini":
        return "bundled"
    if name in _MADE:
        return _MADE[name][1]
    found = (_find_in(name, d) for _, d in _search_dirs(name, data_dir))
    return next((str(f) for f in found if f is not None), None)


def _remedy(path: Path) -> str:
    """What to do about a bad file at ``path``, by where it lies."""
    path = Path(os.path.abspath(path))
    if path.is_relative_to(os.path.abspath(cache_dir())):
        return "delete it and let pyrozoo download it again"
    if path.is_relative_to(os.path.abspath(DEBIAN_FASHION_MNIST)):
        return "re-install the dataset (`apt-get install --reinstall dataset-fashion-mnist`)"
    return "replace it with a good copy, or delete it and let pyrozoo find or download the dataset again"


def _corrupt(path: Path, problem: str, kind: str = "dataset") -> PyrozooError:
    """The error for a file whose contents are wrong: names the file, the problem and the remedy."""
    return PyrozooError(f"corrupt {kind} file {path}: {problem}; {_remedy(path)}")


# What decoding a damaged gzip stream raises: BadGzipFile (an OSError) for a bad header or checksum,
# zlib.error for broken deflate data, EOFError for a stream cut short.
_GZIP_ERRORS = (OSError, EOFError, zlib.error)


@contextlib.contextmanager
def _decoding(path: Path, kind: str, errors: tuple[type[Exception], ...] = _GZIP_ERRORS) -> Iterator[None]:
    """Turn what reading and decoding ``path`` raises into one PyrozooError naming the file.

    Only the reading and decoding of bytes runs inside, so a bug elsewhere still shows as a bug.
    """
    try:
        yield
    except PyrozooError:
        raise
    except errors as e:
        if isinstance(e, OSError) and not isinstance(e, gzip.BadGzipFile):  # no permission, a folder, ...
            raise PyrozooError(f"cannot read {kind} file {path}: {e.strerror or e}") from e
        name = "zlib.error" if isinstance(e, zlib.error) else type(e).__name__  # not a bare "error"
        raise _corrupt(path, f"{name}: {e}", kind) from e


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an unsigned-byte IDX file (plain, or gzip if named *.gz); a malformed file raises PyrozooError."""
    path = Path(path)
    with _decoding(path, "IDX"):
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
            data = f.read()
    # Header: two zero bytes, type code 0x08 (unsigned byte), number of dims, each dim a big-endian int32.
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] == 0:
        raise _corrupt(path, f"bad magic number 0x{data[:4].hex()} (want 0x000008 and ndim)", "IDX")
    header = 4 + 4 * data[3]
    if len(data) < header:
        raise _corrupt(path, f"{len(data)} bytes, too short for the header of {data[3]} dims", "IDX")
    dims = tuple(int.from_bytes(data[i : i + 4], "big") for i in range(4, header, 4))
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise _corrupt(path, f"{len(data)} bytes, but a header for shape {dims} says {expected}", "IDX")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


def _labels(labels: np.ndarray, num_classes: int, path: Path, kind: str) -> torch.Tensor:
    if labels.size and labels.dtype.kind not in "iu":  # (an empty list unpickles as float64)
        raise _corrupt(path, f"labels of type {labels.dtype}, want integers", kind)
    if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
        raise _corrupt(path, f"labels outside 0..{num_classes - 1}", kind)
    return torch.from_numpy(labels.astype(np.int64))


def _check_nonempty(count: int, split: str, path: Path, files: str = "") -> None:
    """An empty split would make standardisation divide by zero (training) or metrics NaN (test)."""
    if count == 0:
        raise PyrozooError(f"{path}{files} holds 0 {split} images; {_remedy(path)}")


def _read_idx_folder(name: str, folder: Path) -> list[torch.Tensor]:
    info = DATASETS[name]
    out = []
    for split in ("train", "t10k"):
        image_path = _idx_path(folder, f"{split}-images-idx3-ubyte")
        label_path = _idx_path(folder, f"{split}-labels-idx1-ubyte")
        images, labels = read_idx(image_path), read_idx(label_path)
        size = info.image_size
        if images.ndim != 3 or images.shape[1:] != (size, size):
            raise _corrupt(image_path, f"images of shape {images.shape}, want (N, {size}, {size})", "IDX")
        if labels.shape != images.shape[:1]:
            raise _corrupt(
                label_path, f"{labels.shape} labels for {len(images)} images in {image_path}", "IDX"
            )
        _check_nonempty(len(images), "training" if split == "train" else "test", image_path)
        out += [torch.from_numpy(images).unsqueeze(1), _labels(labels, info.num_classes, label_path, "IDX")]
    return out


def _read_cifar_batch(path: Path, key: bytes, num_classes: int) -> tuple[np.ndarray, torch.Tensor]:
    """One pickled CIFAR batch (only ever read from folders the user or our download chose)."""
    # Unpickling garbage fails in many ways (UnpicklingError, EOFError, KeyError, ImportError, ...), and a
    # batch that is not a dict fails on indexing: all mean a corrupt file.
    with _decoding(path, "CIFAR", errors=(Exception,)):
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")  # CIFAR was pickled by Python 2: its keys are bytes
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != data.shape[:1]:
        raise _corrupt(path, f"data {data.dtype} {data.shape}, labels {labels.shape}", "CIFAR")
    # A row holds the 1024 red values, then the green, then the blue, each plane 32x32 row-major.
    return data.reshape(-1, 3, 32, 32), _labels(labels, num_classes, path, "CIFAR")


def _read_cifar_folder(name: str, folder: Path) -> list[torch.Tensor]:
    _, train, test, key = _CIFAR[name]
    out = []
    for files in (train, test):
        batches = [_read_cifar_batch(folder / f, key, DATASETS[name].num_classes) for f in files]
        split = "training" if files is train else "test"
        _check_nonempty(sum(len(x) for x, _ in batches), split, folder, f" ({', '.join(files)})")
        out += [torch.from_numpy(np.concatenate([x for x, _ in batches])), torch.cat([y for _, y in batches])]
    return out


def _read(name: str, folder: Path, source: str) -> RawData:
    tensors = _read_cifar_folder(name, folder) if name in _CIFAR else _read_idx_folder(name, folder)
    return RawData(name, *tensors, num_classes=DATASETS[name].num_classes, source=source)


def _load_mini() -> RawData:
    with resources.as_file(resources.files("pyrozoo") / "datasets" / MINI_FILE) as path, np.load(path) as npz:
        a = {key: torch.from_numpy(npz[key]) for key in npz.files}
    info = DATASETS["fashion-mnist-mini"]
    x_train, x_test = a["x_train"][:, None], a["x_test"][:, None]  # stored as (N, 28, 28)
    return RawData(
        info.name, x_train, a["y_train"].long(), x_test, a["y_test"].long(), info.num_classes, "bundled"
    )


def _download(name: str, root: Path) -> None:
    """Download with torchvision into `root`; it leaves the files in the layout `_find_in` reads."""
    import torchvision.datasets  # here, not at the top: importing torchvision is slow and rarely needed

    root.mkdir(parents=True, exist_ok=True)
    getattr(torchvision.datasets, _TORCHVISION[name])(root=str(root), download=True)


def _how_to_get(name: str) -> str:
    files = "the four IDX files (train-images-idx3-ubyte[.gz], ...)"
    if name in _CIFAR:
        files = f"the extracted {_CIFAR[name][0]}/ folder"
    ways = ["`apt-get install dataset-fashion-mnist`"] if name == "fashion-mnist" else []
    ways += [
        f"put {files} in a folder DIR and pass --data-dir DIR or set PYROZOO_DATA=DIR",
        f"let pyrozoo download it (needs internet; into {cache_dir()}, or $PYROZOO_CACHE if set)",
    ]
    return "; or ".join(ways)


def load(
    name: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    target: str | None = None,
    task: str | None = None,
) -> RawData:
    """Load a dataset as uint8 images (N, C, H, W) and int64 labels, downloading it if allowed and needed; or a
    regression set (toy1d, diabetes) as float features (N, D, 1, 1) and float targets; or a user's CSV table
    ``name`` (a path ending in .csv) with the column ``target`` as target (``task`` "regress" by default)."""
    if is_table(name):
        return read_table(name, target, task)
    _info(name)
    if target is not None:
        raise PyrozooError(f"--target names a column of a --data FILE.csv; {name} is a named dataset")
    if task is not None and task != DATASETS[name].task:
        raise PyrozooError(f"{name} is a {DATASETS[name].task} dataset, not a {task} one")
    if name == "fashion-mnist-mini":
        return _load_mini()
    if name in _MADE:
        return _MADE[name][0]()
    if data_dir is not None:
        folder = _find_in(name, Path(data_dir).expanduser())
        if folder is not None:
            return _read(name, folder, str(folder))
        # never another copy in its place: the user asked for this folder's, and would not know it was skipped
        files = "the four IDX files" if name not in _CIFAR else f"the extracted {_CIFAR[name][0]}/ folder"
        raise PyrozooError(
            f"--data-dir {data_dir} does not hold dataset '{name}' (looked for {files} in it and in "
            f"torchvision's layout under it): give the folder that holds them, or leave --data-dir out to use "
            f"{_elsewhere(name)}"
        )
    found = locate(name)
    if found is not None:
        return _read(name, Path(found), found)
    problem = "download not allowed"
    if download:
        root = cache_dir()
        try:
            _download(name, root)
        except Exception as e:  # no network, a dead mirror, an unwritable cache: one message below
            problem = f"download into {root} failed: {' '.join(str(e).split())}"  # torchvision's spans lines
        else:
            folder = _find_in(name, root)
            if folder is not None:
                return _read(name, folder, f"downloaded to {folder}")
            problem = f"download into {root} left no files we can read"
    places = ", ".join(f"{label} {d}" for label, d in _search_dirs(name, data_dir))
    raise PyrozooError(
        f"dataset '{name}' not found (looked in {places}, each also in torchvision's layout); "
        f"{problem}. To get it: {_how_to_get(name)}"
    )


def _elsewhere(name: str) -> str:
    """Where the data set would come from without --data-dir, in words."""
    found = locate(name)
    return found if found is not None else f"a download into {cache_dir()}"


def load_default(data_dir: str | os.PathLike | None = None) -> tuple[RawData, str | None]:
    """Full Fashion-MNIST if found or downloadable; else the bundled subset and a warning saying so."""
    try:
        return load("fashion-mnist", data_dir), None
    except PyrozooError as e:
        # When the set is missing, the error already says where we looked and how to get it.
        warning = (
            "full Fashion-MNIST not available, so using the bundled subset 'fashion-mnist-mini' "
            f"(4000 training / 1000 test images); results will not match full-data runs. Reason: {e}"
        )
        return load("fashion-mnist-mini"), warning


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) std in float64, exact: from a histogram of the 256 uint8 values."""
    counts = torch.stack(
        [torch.bincount(x[:, c].flatten(), minlength=256) for c in range(x.shape[1])]
    ).double()
    values = torch.arange(256, dtype=torch.float64)
    n = counts.sum(1)
    mean = counts @ values / n
    std = ((counts * (values - mean[:, None]) ** 2).sum(1) / n).sqrt()
    # A constant channel would divide by zero; with std 1 it is just centred (to 0).
    return mean, torch.where(std > 0, std, 1.0)


def prepare(raw: RawData, pad_to: int | None = None, device: str | torch.device = "cpu") -> Prepared:
    """Standardise per channel with training-image statistics, then zero-pad (after that) to pad_to. Float
    features (tabular data) are standardised per feature, and regression targets with the training targets'
    mean and std (kept in ``y_mean``, ``y_std``)."""
    if raw.x_train.is_floating_point():
        return _prepare_features(raw, device)
    h, w = raw.x_train.shape[2:]
    if pad_to is not None and pad_to < max(h, w):
        raise PyrozooError(
            f"cannot pad the {h}x{w} images of {raw.name} to {pad_to}x{pad_to}: smaller than the images"
        )
    # The readers refuse empty splits too, naming the file; a RawData built in memory is caught here.
    for split, x, purpose in (("training", raw.x_train, "train on"), ("test", raw.x_test, "evaluate on")):
        if len(x) == 0:
            raise PyrozooError(f"dataset {raw.name} ({raw.source}) has 0 {split} images: none to {purpose}")
    mean, std = (s.float() for s in _channel_stats(raw.x_train))

    def standardise(x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - mean[:, None, None]) / std[:, None, None]
        if pad_to is not None:  # odd differences put the extra pixel at the bottom and right
            left, top = (pad_to - w) // 2, (pad_to - h) // 2
            x = F.pad(x, (left, pad_to - w - left, top, pad_to - h - top))
        return x.to(device)

    return Prepared(
        standardise(raw.x_train),
        raw.y_train.to(device),
        standardise(raw.x_test),
        raw.y_test.to(device),
        raw.num_classes,
        mean.to(device),
        std.to(device),
        raw.source,
        raw.name,
    )


# --- regression and tabular data ------------------------------------------------------------------------------

TASKS = ("classify", "regress")


def is_table(name: str | None) -> bool:
    """Whether ``--data`` names a user's CSV file rather than a registered dataset."""
    return name is not None and str(name).lower().endswith(".csv")


def dataset_task(name: str | None, task: str | None = None) -> str:
    """The task a run on ``name`` does: the dataset's, or for a CSV table ``task`` (default "regress")."""
    if task is not None and task not in TASKS:
        raise PyrozooError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if is_table(name):
        return task or "regress"
    return DATASETS[name].task if name is not None else "classify"


def _split(n: int, test_fraction: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed train/test split of ``n`` rows (seed 0, whatever the run's seed: runs of other seeds are then
    compared on the same test points)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    n_test = max(1, round(n * test_fraction))
    return order[n_test:], order[:n_test]


def _features(x: np.ndarray) -> torch.Tensor:
    """Rows of features as (N, D, 1, 1) float32: the layout of a 1x1 image with D channels, which the MLP takes."""
    return torch.from_numpy(np.asarray(x, dtype=np.float32)).reshape(len(x), -1, 1, 1)


def toy1d(n_train: int = 600, n_test: int = 600) -> RawData:
    """The synthetic 1-D benchmark: ``y = x sin(x) + eps``, ``eps ~ N(0, (0.1 + 0.2 |x|)^2)`` (noise that grows
    with ``|x|``), with inputs uniform on ``[-4, -1] U [1, 4]``: a gap in ``(-1, 1)`` where a model should say it
    does not know. Training and test points come from the same input distribution; fixed seeds, so every run
    sees the same data."""
    g = np.random.default_rng(20261130)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = g.uniform(1, 4, n) * g.choice([-1.0, 1.0], n)
        y = x * np.sin(x) + g.normal(0, 1, n) * toy1d_noise_std(x)
        return x, y

    (xa, ya), (xb, yb) = draw(n_train), draw(n_test)
    as_y = lambda y: torch.from_numpy(y.astype(np.float32))  # noqa: E731
    return RawData(
        "toy1d", _features(xa[:, None]), as_y(ya), _features(xb[:, None]), as_y(yb), 1, "synthetic", "regress"
    )


def toy1d_mean(x):
    """The toy1d benchmark's true regression function, ``x sin x``."""
    return x * np.sin(x)


def toy1d_noise_std(x):
    """The toy1d benchmark's true noise standard deviation, ``0.1 + 0.2 |x|``."""
    return 0.1 + 0.2 * np.abs(x)


def diabetes() -> RawData:
    """scikit-learn's bundled diabetes data (Efron et al. 2004: 442 patients, 10 baseline features, disease
    progression after a year), split 80/20. It ships inside scikit-learn, so it needs no download; sklearn is
    an optional extra (``pip install 'pyrozoo[tabular]'``)."""
    x, y = _sklearn_loader("diabetes", "load_diabetes")(return_X_y=True, scaled=False)
    train, test = _split(len(x))
    xs, ys = _features(x), torch.from_numpy(np.asarray(y, dtype=np.float32))
    return RawData(
        "diabetes", xs[train], ys[train], xs[test], ys[test], 1, "scikit-learn (bundled)", "regress"
    )


def _sklearn_loader(name: str, loader: str):
    """scikit-learn's loader of its bundled copy of dataset ``name``; sklearn is an optional extra."""
    try:
        import sklearn.datasets
    except ImportError:
        raise PyrozooError(
            f"dataset '{name}' is read from scikit-learn's bundled copy: pip install 'pyrozoo[tabular]' "
            "(or scikit-learn)"
        ) from None
    return getattr(sklearn.datasets, loader)


DIGITS_BOX = 20  # MNIST's digits were scaled to fit 20x20 and centred in 28x28 (LeCun et al. 1998)


def digits() -> RawData:
    """scikit-learn's bundled handwritten digits (the UCI optical recognition set: 1797 images, 8x8 blocks of
    counts 0..16), scaled bilinearly to MNIST's layout, a 20x20 box in the middle of 28x28 with pixels 0..255, so
    that a net of the MNIST-likes takes them: a digit set that needs no download, e.g. out of distribution for a
    Fashion-MNIST run. Split 50/50 (as scikit-learn's own digits example) by a fixed permutation."""
    images, y = _sklearn_loader("digits", "load_digits")(return_X_y=True)
    x = torch.from_numpy(np.asarray(images, dtype=np.float32)).reshape(-1, 1, 8, 8) * (255 / 16)
    x = F.interpolate(x, size=(DIGITS_BOX, DIGITS_BOX), mode="bilinear", align_corners=False)
    margin = (28 - DIGITS_BOX) // 2
    x = F.pad(x, (margin, margin, margin, margin)).clamp(0, 255).round().to(torch.uint8)
    ys = torch.from_numpy(np.asarray(y, dtype=np.int64))
    train, test = _split(len(x), test_fraction=0.5)
    return RawData("digits", x[train], ys[train], x[test], ys[test], 10, "scikit-learn (bundled)")


_MADE = {
    "toy1d": (toy1d, "synthetic"),
    "diabetes": (diabetes, "scikit-learn (bundled)"),
    "digits": (digits, "scikit-learn (bundled)"),
}
# made from an optional extra
_NEEDS = {name: ("sklearn", "pip install 'pyrozoo[tabular]'") for name in ("diabetes", "digits")}


def availability(name: str) -> str:
    """Whether ``load(name)`` can read the dataset here and from where, or what it takes: for ``pyrozoo info``."""
    if name in _NEEDS and importlib.util.find_spec(_NEEDS[name][0]) is None:
        return f"needs {_NEEDS[name][0]}: {_NEEDS[name][1]}"
    where = locate(name)
    if where == "bundled":
        return "bundled with pyrozoo"
    if name in _MADE:
        return "made on the fly" if where == "synthetic" else f"read from {where}"
    if where:
        return f"found in {where}"
    return "not here: downloaded on first use, or give --data-dir FOLDER"


def read_csv(path: str | os.PathLike):
    """``pandas.read_csv``, refusing a header that names a column twice (pandas would rename the second copy
    ``a.1`` and go on, so a feature would be read by a name that is not in the file)."""
    import pandas as pd

    header = pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False)
    names = [str(n) for n in header.iloc[0]] if len(header) else []
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise PyrozooError(
            f"{path}: the header names column {', '.join(map(repr, twice))} more than once; "
            "give every column its own name"
        )
    return pd.read_csv(path)


# The largest magnitude a value may have: features and targets are float32.
_LARGEST = float(np.finfo(np.float32).max)


def check_finite(path, table) -> None:
    """Refuse numeric columns with infinite values, or values that overflow to inf as float32 (training would
    then only say that the loss became nan, or report inf metrics)."""
    import pandas as pd

    for column in table:
        if not pd.api.types.is_numeric_dtype(table[column]) or pd.api.types.is_bool_dtype(table[column]):
            continue
        values = table[column].to_numpy(np.float64)
        if not np.isfinite(values).all():
            raise PyrozooError(f"{path}: column {column!r} has infinite values; fix or drop those rows first")
        if np.abs(values).max(initial=0.0) > _LARGEST:
            raise PyrozooError(
                f"{path}: column {column!r} has values too large for float32 (up to {np.abs(values).max():g}; "
                f"at most {_LARGEST:.3g}): rescale the column first"
            )


def read_table(path: str | os.PathLike, target: str | None, task: str | None = None) -> RawData:
    """A user's CSV table: every column but ``target`` is a numeric feature; ``target`` is a number to regress
    on (``task`` "regress", the default) or a label (``"classify"``: its distinct values, sorted, become classes
    0..K-1). Rows are split 80/20 into training and test sets by a fixed permutation."""
    import pandas as pd

    task = dataset_task(str(path), task)
    if target is None:
        raise PyrozooError(f"--data {path} is a table: name its target column with --target COLUMN")
    try:
        table = read_csv(path)
    except FileNotFoundError:
        raise PyrozooError(f"no such file: {path}") from None
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise PyrozooError(f"cannot read {path} as CSV ({' '.join(str(e).split())})") from None
    if target not in table:
        raise PyrozooError(
            f"{path} has no column {target!r}; its columns: {', '.join(map(str, table.columns))}"
        )
    features = table.drop(columns=[target])
    if features.shape[1] == 0 or len(table) < 2:
        raise PyrozooError(f"{path} needs at least one feature column besides {target!r} and two rows")
    bad = [str(c) for c in features if not pd.api.types.is_numeric_dtype(features[c])]
    if bad:
        raise PyrozooError(
            f"{path}: feature columns must be numeric; {', '.join(bad)} are not (encode them first)"
        )
    if table.isna().any().any():
        column = str(table.columns[table.isna().any()][0])
        raise PyrozooError(f"{path}: column {column!r} has missing values; fill or drop them first")
    check_finite(path, table)
    if task == "regress":
        if not pd.api.types.is_numeric_dtype(table[target]):
            raise PyrozooError(
                f"{path}: target {target!r} is not numeric; for a label column pass --task classify"
            )
        y = torch.from_numpy(table[target].to_numpy(np.float32))
        num_classes = 1
    else:
        classes, codes = np.unique(table[target].to_numpy(), return_inverse=True)
        if len(classes) < 2:
            raise PyrozooError(f"{path}: target {target!r} has only one value; nothing to classify")
        y, num_classes = torch.from_numpy(codes.astype(np.int64)), len(classes)
    x = _features(features.to_numpy(np.float64))
    train, test = _split(len(x))
    labels = None if task == "regress" else tuple(classes.tolist())
    names = tuple(map(str, features.columns))
    return RawData(
        Path(path).name, x[train], y[train], x[test], y[test], num_classes, str(path), task, names, labels
    )


def _prepare_features(raw: RawData, device) -> Prepared:
    """Float features standardised per feature with training statistics; regression targets likewise."""
    for split, x in (("training", raw.x_train), ("test", raw.x_test)):
        if len(x) == 0:
            raise PyrozooError(f"dataset {raw.name} ({raw.source}) has 0 {split} rows")
    x64 = raw.x_train.double()
    mean = x64.mean(dim=(0, 2, 3))
    std = x64.std(dim=(0, 2, 3), unbiased=False)
    std = torch.where(std > 0, std, 1.0)  # a constant feature is just centred

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - mean[:, None, None]) / std[:, None, None]).float().to(device)

    y_mean, y_std = 0.0, 1.0
    y_train, y_test = raw.y_train, raw.y_test
    if raw.task == "regress":
        y_mean = float(raw.y_train.double().mean())
        y_std = float(raw.y_train.double().std(unbiased=False))
        if y_std == 0:
            raise PyrozooError(
                f"dataset {raw.name} ({raw.source}): the target is {y_mean:g} in every training row; "
                "a constant has nothing to regress on"
            )
        y_train = ((raw.y_train.double() - y_mean) / y_std).float()
        y_test = ((raw.y_test.double() - y_mean) / y_std).float()
    for split, x, y in (("training", raw.x_train, y_train), ("test", raw.x_test, y_test)):
        if not (torch.isfinite(standardise(x)).all() and torch.isfinite(y).all()):
            raise PyrozooError(
                f"dataset {raw.name} ({raw.source}): its {split} values are not finite once standardised "
                "(inf, or too large for float32): fix or rescale them first"
            )
    return Prepared(
        standardise(raw.x_train),
        y_train.to(device),
        standardise(raw.x_test),
        y_test.to(device),
        raw.num_classes,
        mean.float().to(device),
        std.float().to(device),
        raw.source,
        raw.name,
        raw.task,
        y_mean,
        y_std,
    )


class Minibatches:
    """Random minibatches: the data are shuffled, consumed in order, and shuffled again when used up."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size = size, min(batch_size, size)
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.randperm(size, generator=self.generator), 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.size:
            self.order, self.position = torch.randperm(self.size, generator=self.generator), 0
        indices = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]
