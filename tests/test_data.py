"""Tests for pyrozoo.data: IDX/CIFAR readers, lookup order, error messages, the bundled subset, prepare()."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from pyrozoo import data
from pyrozoo.errors import PyrozooError


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees the user's data, cache or Debian copy, and none can reach the network."""
    monkeypatch.delenv("PYROZOO_DATA", raising=False)
    monkeypatch.setenv("PYROZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))

    def no_network(name, root):
        raise ConnectionError("network disabled\n  in tests")

    monkeypatch.setattr(data, "_download", no_network)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array in IDX format, gzipped if the name ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") if path.suffix == ".gz" else open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist_like(
    folder: Path, n_train: int = 12, n_test: int = 5, gz: bool = True, seed: int = 0
) -> dict:
    """Four IDX files of random 28x28 images; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{split}-images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}-labels"] = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", arrays[f"{split}-images"])
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", arrays[f"{split}-labels"])
    return arrays


# --- IDX reader ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 4, 5), (2, 1, 3, 3)])
def test_read_idx_round_trip(tmp_path, name, shape):
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    write_idx(tmp_path / name, array)
    np.testing.assert_array_equal(data.read_idx(tmp_path / name), array)


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_load_fashion_mnist_from_both_layouts(tmp_path, gz, layout):
    folder = tmp_path / "d" if layout == "flat" else tmp_path / "d" / "FashionMNIST" / "raw"
    arrays = write_mnist_like(folder, gz=gz)
    raw = data.load("fashion-mnist", data_dir=tmp_path / "d", download=False)
    assert raw.source == str(folder) == data.locate("fashion-mnist", tmp_path / "d")
    assert raw.x_train.shape == (12, 1, 28, 28) and raw.x_test.shape == (5, 1, 28, 28)
    assert raw.x_train.dtype == torch.uint8 and raw.y_train.dtype == torch.int64 and raw.num_classes == 10
    np.testing.assert_array_equal(raw.x_train[:, 0].numpy(), arrays["train-images"])
    np.testing.assert_array_equal(raw.y_test.numpy(), arrays["t10k-labels"])


def test_mnist_uses_its_own_torchvision_folder(tmp_path):
    write_mnist_like(tmp_path / "MNIST" / "raw")
    assert data.locate("mnist", tmp_path) == str(tmp_path / "MNIST" / "raw")
    assert data.locate("fashion-mnist", tmp_path) is None


def test_lookup_order(tmp_path, monkeypatch):
    places = {p: tmp_path / p for p in ("arg", "env", "cache", "debian")}
    for i, folder in enumerate(places.values()):
        write_mnist_like(folder, n_train=10 + i)
    monkeypatch.setenv("PYROZOO_DATA", str(places["env"]))
    monkeypatch.setenv("PYROZOO_CACHE", str(places["cache"]))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(places["debian"]))

    raw = data.load("fashion-mnist", data_dir=places["arg"], download=False)
    assert raw.source == str(places["arg"]) and len(raw.x_train) == 10
    assert data.load("fashion-mnist", download=False).source == str(places["env"])
    monkeypatch.delenv("PYROZOO_DATA")
    assert data.load("fashion-mnist", download=False).source == str(places["cache"])
    monkeypatch.setenv("PYROZOO_CACHE", str(tmp_path / "empty"))
    raw = data.load("fashion-mnist", download=False)
    assert raw.source == str(places["debian"]) and len(raw.x_train) == 13
    # The Debian folder is for Fashion-MNIST only.
    assert data.locate("mnist") is None


def test_successful_download_is_read_from_the_cache(tmp_path, monkeypatch):
    def fake_download(name, root):
        write_mnist_like(root / "FashionMNIST" / "raw")

    monkeypatch.setattr(data, "_download", fake_download)
    assert data.locate("fashion-mnist") is None
    raw = data.load("fashion-mnist")
    assert raw.source == f"downloaded to {tmp_path / 'cache' / 'FashionMNIST' / 'raw'}"
    assert raw.x_train.shape == (12, 1, 28, 28)


@pytest.mark.parametrize("download", [True, False])
def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path, download, monkeypatch):
    monkeypatch.setenv("PYROZOO_DATA", str(tmp_path / "mine"))
    with pytest.raises(PyrozooError) as info:
        data.load("fashion-mnist", download=download)
    message = str(info.value)
    for text in (
        "apt-get install dataset-fashion-mnist",
        "--data-dir",
        "PYROZOO_DATA",
        str(tmp_path / "mine"),
        str(tmp_path / "cache"),
        str(tmp_path / "no-debian"),
    ):
        assert text in message
    assert ("network disabled in tests" in message) == download  # on one line
    assert "\n" not in message


def test_missing_cifar_message_names_the_folder():
    with pytest.raises(PyrozooError, match="cifar-100-python"):
        data.load("cifar100")


def test_unknown_dataset_lists_known_names():
    with pytest.raises(PyrozooError, match="fashion-mnist, fashion-mnist-mini, mnist, cifar10, cifar100"):
        data.load("imagenet")
    with pytest.raises(PyrozooError, match="unknown dataset"):
        data.locate("imagenet")


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda p: p.write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big")),  # truncated header
        lambda p: p.write_bytes(b"\x00\x00\x0d\x01" + (2).to_bytes(4, "big") + bytes(8)),  # float type code
        lambda p: p.write_bytes(b"not gzip at all"),  # bad gzip stream
        lambda p: p.write_bytes(p.read_bytes()[:-100]),  # truncated gzip stream
        lambda p: write_idx(p, np.zeros((12, 27, 28), np.uint8)),  # wrong image size
    ],
)
def test_corrupt_idx_names_the_file(tmp_path, corrupt):
    write_mnist_like(tmp_path)
    target = tmp_path / "train-images-idx3-ubyte.gz"
    corrupt(target)
    with pytest.raises(PyrozooError, match=re.escape(str(target))):
        data.load("fashion-mnist", data_dir=tmp_path, download=False)


def test_idx_size_mismatch_and_bad_labels(tmp_path):
    write_mnist_like(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))  # one label byte short
    with pytest.raises(PyrozooError, match="corrupt IDX file"):
        data.read_idx(path)
    write_idx(path, np.array([0, 1, 2, 3, 10], np.uint8))
    with pytest.raises(PyrozooError, match="outside 0..9"):
        data.load("fashion-mnist", data_dir=tmp_path, download=False)
    write_idx(path, np.array([0, 1, 2], np.uint8))
    with pytest.raises(PyrozooError, match="labels for 5 images"):
        data.load("fashion-mnist", data_dir=tmp_path, download=False)


# --- CIFAR reader -------------------------------------------------------------------------------------------


def write_cifar_batch(path: Path, rows: np.ndarray, labels: list[int], key: bytes) -> None:
    """Pickle a batch the way CIFAR's Python version does: a dict with bytes keys."""
    batch = {b"batch_label": b"test", b"data": rows, key: labels, b"filenames": [b"x.png"] * len(labels)}
    if key == b"fine_labels":
        batch[b"coarse_labels"] = [99 - y for y in labels]  # must not be used
    with open(path, "wb") as f:
        pickle.dump(batch, f)


def test_cifar10(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(2)
    rows = {
        f: rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        for f in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]
    }
    for i, (f, r) in enumerate(rows.items()):
        write_cifar_batch(folder / f, r, [(i + j) % 10 for j in range(4)], b"labels")
    raw = data.load("cifar10", data_dir=tmp_path, download=False)
    assert raw.source == str(folder) and raw.num_classes == 10
    assert raw.x_train.shape == (20, 3, 32, 32) and raw.x_test.shape == (4, 3, 32, 32)
    assert raw.x_train.dtype == torch.uint8 and raw.y_train.dtype == torch.int64
    assert raw.y_train[:4].tolist() == [1, 2, 3, 4] and raw.y_test.tolist() == [0, 1, 2, 3]
    # Channel order: 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    batch2 = rows["data_batch_2"]
    for channel in range(3):
        assert raw.x_train[5, channel, 3, 7] == batch2[1, channel * 1024 + 3 * 32 + 7]


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train = np.arange(6 * 3072, dtype=np.int64).reshape(6, 3072).astype(np.uint8)
    write_cifar_batch(folder / "train", train, [0, 5, 17, 42, 98, 99], b"fine_labels")
    write_cifar_batch(folder / "test", train[:2], [3, 64], b"fine_labels")
    raw = data.load("cifar100", data_dir=tmp_path, download=False)
    assert (
        raw.num_classes == 100 and raw.x_train.shape == (6, 3, 32, 32) and raw.x_test.shape == (2, 3, 32, 32)
    )
    assert raw.y_train.tolist() == [0, 5, 17, 42, 98, 99] and raw.y_test.tolist() == [3, 64]
    assert raw.x_train[1, 2, 0, 1] == train[1, 2048 + 1]


def test_corrupt_cifar_names_the_file(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    (folder / "train").write_bytes(b"garbage")
    write_cifar_batch(folder / "test", np.zeros((2, 3072), np.uint8), [0, 1], b"fine_labels")
    with pytest.raises(PyrozooError, match=re.escape(str(folder / "train"))):
        data.load("cifar100", data_dir=tmp_path, download=False)
    write_cifar_batch(folder / "train", np.zeros((2, 3000), np.uint8), [0, 1], b"fine_labels")
    with pytest.raises(PyrozooError, match="corrupt CIFAR file"):
        data.load("cifar100", data_dir=tmp_path, download=False)


# --- bad files: one table, each an error naming the file ---------------------------------------------------

CIFAR100_FILES = {"train": 6, "test": 2}


def write_cifar100(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in CIFAR100_FILES.items():
        write_cifar_batch(folder / name, np.zeros((n, 3072), np.uint8), list(range(n)), b"fine_labels")


def recompressed(mutate):
    """Damage a gzipped file's content, and gzip it again with no name in its header (so that its deflate
    data starts at byte 10), then damage the gzip bytes with ``mutate``."""

    def damage(path: Path) -> None:
        path.write_bytes(mutate(gzip.compress(gzip.decompress(path.read_bytes()), mtime=0)))

    return damage


def gz_bytes(offset: int, value: bytes):
    """Overwrite the gzip stream at ``offset`` (negative: from the end)."""

    def mutate(stream: bytes) -> bytes:
        start = offset % len(stream)
        return stream[:start] + value + stream[start + len(value) :]

    return recompressed(mutate)


def content(mutate):
    """Replace the IDX bytes inside a gzipped file with ``mutate(bytes)``."""
    return lambda p: p.write_bytes(gzip.compress(mutate(gzip.decompress(p.read_bytes()))))


def raw_bytes(value: bytes):
    return lambda p: p.write_bytes(value)


def cut(n: int):
    """Drop the last ``n`` bytes of the file."""
    return lambda p: p.write_bytes(p.read_bytes()[:-n])


def idx(array: np.ndarray):
    return lambda p: write_idx(p, array)


def empty_split(p: Path) -> None:
    write_idx(p, np.zeros((0, 28, 28), np.uint8))
    write_idx(p.with_name(p.name.replace("images-idx3", "labels-idx1")), np.zeros(0, np.uint8))


def pickled(obj):
    return lambda p: p.write_bytes(pickle.dumps(obj))


def cifar(n: int, pixels=np.uint8, width: int = 3072, labels=None):
    labels = [0] * n if labels is None else labels
    return pickled({b"data": np.zeros((n, width), pixels), b"fine_labels": labels})


U8 = np.uint8
TRAIN_X, TRAIN_Y = "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"
TEST_X, TEST_Y = "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"
# (case, dataset kind, file to damage, damage, what pyrozoo must turn into the PyrozooError: the underlying
# exception type, kept as __cause__, or a phrase of the message)
BAD_FILES = [
    # the gzip layer
    ("broken deflate data", "idx", TRAIN_Y, gz_bytes(10, b"\xff"), zlib.error),  # reserved block type
    ("truncated gzip", "idx", TRAIN_Y, cut(9), EOFError),
    ("truncated gzip images", "idx", TRAIN_X, cut(100), EOFError),
    ("not gzip at all", "idx", TEST_X, raw_bytes(b"not gzip at all"), gzip.BadGzipFile),
    ("gzip checksum wrong", "idx", TEST_Y, gz_bytes(-8, b"\0\0\0\0"), gzip.BadGzipFile),
    ("gzip length wrong", "idx", TEST_Y, gz_bytes(-4, b"\1"), gzip.BadGzipFile),
    ("empty gzip file", "idx", TEST_Y, raw_bytes(b""), "bad magic"),
    # the IDX header and sizes
    (
        "float type code",
        "idx",
        TRAIN_X,
        content(lambda b: b"\0\0\x0d\1" + (2).to_bytes(4, "big") + bytes(8)),
        "bad magic",
    ),
    ("zero dims", "idx", TRAIN_Y, content(lambda b: b"\0\0\x08\0"), "bad magic"),
    ("nonzero magic", "idx", TRAIN_Y, content(lambda b: b"\1" + b[1:]), "bad magic"),
    (
        "truncated header",
        "idx",
        TRAIN_X,
        content(lambda b: b"\0\0\x08\3" + (5).to_bytes(4, "big")),
        "too short for the header",
    ),
    ("data short of the dims", "idx", TEST_Y, content(lambda b: b[:-1]), "header for shape"),
    ("data beyond the dims", "idx", TEST_X, content(lambda b: b + b"\0"), "header for shape"),
    ("plain file, wrong size", "plain", "train-images-idx3-ubyte", cut(28 * 14), "header for shape"),
    ("images 27x28", "idx", TRAIN_X, idx(np.zeros((12, 27, 28), U8)), "images of shape"),
    ("images with a channel axis", "idx", TEST_X, idx(np.zeros((5, 28, 28, 1), U8)), "images of shape"),
    ("images 1-D", "idx", TEST_X, idx(np.zeros(5, U8)), "images of shape"),
    # labels
    ("labels 2-D", "idx", TRAIN_Y, idx(np.zeros((12, 1), U8)), "labels for 12 images"),
    ("fewer labels than images", "idx", TEST_Y, idx(np.array([0, 1, 2], U8)), "labels for 5 images"),
    ("more labels than images", "idx", TRAIN_Y, idx(np.zeros(13, U8)), "labels for 12 images"),
    ("label 10 of 10 classes", "idx", TEST_Y, idx(np.array([0, 1, 2, 3, 10], U8)), "outside 0..9"),
    ("label 255", "idx", TRAIN_Y, idx(np.full(12, 255, U8)), "outside 0..9"),
    # empty splits
    ("0 training images", "idx", TRAIN_X, empty_split, "0 training images"),
    ("0 test images", "idx", TEST_X, empty_split, "0 test images"),
    # CIFAR pickles
    ("garbage pickle", "cifar", "train", raw_bytes(b"garbage"), pickle.UnpicklingError),
    ("truncated pickle", "cifar", "train", cut(50), pickle.UnpicklingError),
    ("empty pickle", "cifar", "test", raw_bytes(b""), EOFError),
    ("pickle of a list", "cifar", "train", pickled([1, 2, 3]), TypeError),
    ("pickle without labels", "cifar", "test", pickled({b"data": np.zeros((2, 3072), U8)}), KeyError),
    ("rows of 3000 pixels", "cifar", "train", cifar(6, width=3000), "data uint8 (6, 3000)"),
    ("int64 pixels", "cifar", "train", cifar(6, pixels=np.int64), "data int64"),
    ("one label for two rows", "cifar", "test", cifar(2, labels=[0]), "labels (1,)"),
    ("label 100 of 100 classes", "cifar", "test", cifar(2, labels=[0, 100]), "outside 0..99"),
    ("float labels", "cifar", "test", cifar(2, labels=[0.5, 1.0]), "want integers"),
    ("0 CIFAR training images", "cifar", "train", cifar(0), "0 training images"),
    ("0 CIFAR test images", "cifar", "test", cifar(0), "0 test images"),
]


def damaged_dataset(root: Path, kind: str, filename: str, damage) -> tuple[str, Path, Path]:
    """A small good dataset under ``root`` with one file damaged: (dataset name, folder, damaged file)."""
    if kind == "cifar":
        folder = root / "cifar-100-python"
        write_cifar100(folder)
        name = "cifar100"
    else:
        folder = root
        write_mnist_like(folder, gz=kind != "plain")
        name = "fashion-mnist"
    damage(folder / filename)
    return name, folder, folder / filename


@pytest.mark.parametrize("case, kind, filename, damage, cause", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_file_is_one_line_naming_the_file(tmp_path, case, kind, filename, damage, cause):
    name, folder, path = damaged_dataset(tmp_path / "data", kind, filename, damage)
    with pytest.raises(PyrozooError) as info:
        data.load(name, data_dir=tmp_path / "data", download=False)
    message = str(info.value)
    assert str(path) in message or (str(folder) in message and path.name in message), message
    assert "\n" not in message
    assert "replace it with a good copy, or delete it" in message  # what to do, for a --data-dir folder
    if isinstance(cause, str):
        assert cause in message
    else:  # the underlying error is kept as the cause, and named in the message
        assert isinstance(info.value.__cause__, cause), repr(info.value.__cause__)
        assert cause.__name__ in message


def test_bad_file_remedy_depends_on_where_it_lies(tmp_path, monkeypatch):
    write_mnist_like(tmp_path / "cache" / "FashionMNIST" / "raw")
    gz_bytes(10, b"\xff")(tmp_path / "cache" / "FashionMNIST" / "raw" / TRAIN_Y)
    with pytest.raises(PyrozooError, match="delete it and let pyrozoo download it again"):
        data.load("fashion-mnist")
    write_mnist_like(tmp_path / "debian")
    (tmp_path / "debian" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"junk")
    monkeypatch.setenv("PYROZOO_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    with pytest.raises(PyrozooError, match=r"apt-get install --reinstall dataset-fashion-mnist"):
        data.load("fashion-mnist")


def test_unreadable_file_is_not_called_corrupt(tmp_path, monkeypatch):
    write_mnist_like(tmp_path)

    def no_permission(path, mode):  # chmod would not stop root, who runs the tests in some containers
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(data.gzip, "open", no_permission)
    path = re.escape(str(tmp_path / TRAIN_X))
    with pytest.raises(PyrozooError, match=f"^cannot read IDX file {path}: Permission denied$"):
        data.load("fashion-mnist", data_dir=tmp_path, download=False)


@pytest.mark.parametrize("split", ["train", "test"])
def test_prepare_refuses_empty_splits(split):
    raw = raw_data()
    empty = raw.x_train[:0]
    if split == "train":
        raw = dataclasses.replace(raw, x_train=empty, y_train=raw.y_train[:0])
    else:
        raw = dataclasses.replace(raw, x_test=empty, y_test=raw.y_test[:0])
    word = "training" if split == "train" else "test"
    with pytest.raises(PyrozooError, match=f"synthetic \\(memory\\) has 0 {word} images"):
        data.prepare(raw)


def test_cli_bad_data_file_exits_2_with_one_line(tmp_path, capsys):
    from pyrozoo.cli import main

    write_mnist_like(tmp_path / "d")
    broken = tmp_path / "d" / TRAIN_Y
    gz_bytes(10, b"\xff")(broken)
    args = ["--data", "fashion-mnist", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "run")]
    code = main(["train", *args, "--epochs", "1", "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("pyrozoo: error: corrupt IDX file") and str(broken) in err


# --- bundled subset and the default -------------------------------------------------------------------------


def test_mini_dataset():
    raw = data.load("fashion-mnist-mini")
    assert raw.source == "bundled" == data.locate("fashion-mnist-mini")
    assert raw.x_train.shape == (4000, 1, 28, 28) and raw.x_test.shape == (1000, 1, 28, 28)
    assert raw.x_train.dtype == torch.uint8 and raw.y_train.dtype == torch.int64
    assert torch.bincount(raw.y_train).tolist() == [400] * 10
    assert torch.bincount(raw.y_test).tolist() == [100] * 10


def test_load_default_falls_back_to_the_mini_set():
    raw, warning = data.load_default()
    assert raw.name == "fashion-mnist-mini"
    assert "bundled subset" in warning and "apt-get install dataset-fashion-mnist" in warning


def test_load_default_prefers_the_full_set(tmp_path):
    write_mnist_like(tmp_path / "full")
    raw, warning = data.load_default(tmp_path / "full")
    assert raw.name == "fashion-mnist" and warning is None


@pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="Debian Fashion-MNIST absent"
)
def test_debian_copy_and_mini_subset_agree(monkeypatch):
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
    raw = data.load("fashion-mnist", download=False)
    assert raw.source == "/usr/share/datasets/fashion-mnist"
    assert raw.x_train.shape == (60000, 1, 28, 28) and raw.x_test.shape == (10000, 1, 28, 28)
    assert torch.bincount(raw.y_train).tolist() == [6000] * 10
    mini = data.load("fashion-mnist-mini")
    first = torch.cat([torch.nonzero(raw.y_train == k)[:400, 0] for k in range(10)]).sort().values
    assert torch.equal(mini.x_train, raw.x_train[first]) and torch.equal(mini.y_train, raw.y_train[first])


# --- prepare() ----------------------------------------------------------------------------------------------


def raw_data(channels: int = 3, size: int = 28, n: int = 64) -> data.RawData:
    gen = torch.Generator().manual_seed(3)
    # Channels with different ranges, so a wrong per-channel statistic would show.
    highs = torch.tensor([256, 100, 30][:channels]).view(1, -1, 1, 1)
    x_train = (torch.randint(0, 256, (n, channels, size, size), generator=gen) % highs).to(torch.uint8)
    x_test = torch.full((8, channels, size, size), 255, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=gen)
    return data.RawData("synthetic", x_train, y, x_test, y[:8], 10, "memory")


def test_prepare_standardises_with_training_statistics():
    raw = raw_data()
    prep = data.prepare(raw)
    assert prep.x_train.dtype == torch.float32 and prep.x_train.shape == raw.x_train.shape
    x = prep.x_train.double()
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        x.std((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-6, rtol=0
    )
    expected_mean = raw.x_train.double().mean((0, 2, 3))
    torch.testing.assert_close(prep.mean.double(), expected_mean, rtol=1e-6, atol=0)
    # The test images (all 255) are standardised with the training statistics, not their own.
    expected = ((255 - expected_mean) / raw.x_train.double().std((0, 2, 3), unbiased=False)).float()
    torch.testing.assert_close(prep.x_test[:, :, 5, 5], expected.expand(8, 3))
    assert torch.equal(prep.y_test, raw.y_test) and prep.name == "synthetic" and prep.source == "memory"


def test_prepare_pads_with_zeros():
    raw = raw_data(channels=1)
    plain, padded = data.prepare(raw), data.prepare(raw, pad_to=32)
    assert padded.x_train.shape == (64, 1, 32, 32) and padded.x_test.shape == (8, 1, 32, 32)
    assert torch.equal(padded.x_train[:, :, 2:30, 2:30], plain.x_train)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert torch.all(padded.x_test[:, :, border] == 0) and torch.all(padded.x_test[:, :, ~border] != 0)
    assert data.prepare(raw, pad_to=28).x_train.shape == (64, 1, 28, 28)


def test_prepare_rejects_too_small_pad():
    with pytest.raises(PyrozooError, match="smaller than the images"):
        data.prepare(raw_data(), pad_to=27)


def test_datasets_table():
    assert list(data.DATASETS) == [
        "fashion-mnist", "fashion-mnist-mini", "mnist", "cifar10", "cifar100", "toy1d", "diabetes", "digits"
    ]  # fmt: skip
    assert [name for name, info in data.DATASETS.items() if info.task == "regress"] == ["toy1d", "diabetes"]
    assert data.DATASETS["cifar100"].num_classes == 100 and data.DATASETS["cifar10"].channels == 3


def test_digits_are_sklearns_scaled_to_the_mnist_layout():
    """The bundled UCI digits, 8x8 at 0..16, become 28x28 uint8 images: a 20x20 box of the scaled digit with a
    4-pixel empty border, split 50/50 with every image in one split, labels kept."""
    sklearn = pytest.importorskip("sklearn.datasets")
    images, labels = sklearn.load_digits(return_X_y=True)
    raw = data.load("digits")
    assert raw.x_train.shape[1:] == raw.x_test.shape[1:] == (1, 28, 28) and raw.x_test.dtype == torch.uint8
    assert (len(raw.x_train), len(raw.x_test)) == (899, 898) and data.locate("digits").startswith("scikit")
    x = torch.cat([raw.x_train, raw.x_test])
    assert x[:, :, :4].max() == 0 and x[:, :, -4:].max() == 0 and x[..., :4].max() == 0 and x[..., -4:].max() == 0
    # each image is its 8x8 original: averaging its 20x20 box back down to 8x8 lands near it (bilinear blurs)
    train, test = data._split(len(images), test_fraction=0.5)
    order = torch.cat([train, test])
    original = torch.from_numpy(images.reshape(-1, 1, 8, 8)).float()[order] * 255 / 16
    down = torch.nn.functional.interpolate(x[:, :, 4:24, 4:24].float(), size=(8, 8), mode="area")
    mismatched = original[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))]
    assert (down - original).abs().mean() < 0.5 * (down - mismatched).abs().mean()
    assert torch.equal(torch.from_numpy(labels)[order], torch.cat([raw.y_train, raw.y_test]))
