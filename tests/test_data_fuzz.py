"""Fuzz the IDX/gzip reader: a damaged dataset file loads to the right data or raises PyrozooError, nothing
else.

Two layers are damaged: the gzip stream as stored (one byte overwritten, or the file cut short), and the IDX
bytes inside it (overwritten, then gzipped again). The files are small synthetic Fashion-MNIST-like sets whose
images compress, so the deflate data uses Huffman-coded blocks, where a wrong byte breaks decoding
(``zlib.error``) rather than only the checksum.
"""

from __future__ import annotations

import collections
import gzip
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyrozoo import data
from pyrozoo.errors import PyrozooError

N_TRAIN, N_TEST = 6, 4
FILES = tuple(
    f"{split}-{kind}-ubyte" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")
)


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def gzipped(name: str, content: bytes) -> bytes:
    """Gzip as torchvision's files are: with the original name in the header (so that gets fuzzed too)."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename=name, mode="wb", fileobj=buffer, mtime=0) as f:
        f.write(content)
    return buffer.getvalue()


def synthetic() -> dict[str, np.ndarray]:
    """Smooth images (a per-image gradient and stripes, a little noise), so that they compress."""
    rng = np.random.default_rng(0)
    arrays = {}
    rows, cols = np.mgrid[:28, :28]
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        k = np.arange(n)[:, None, None]
        images = rows * (k + 1) + 40 * ((cols // (k + 2)) % 2) + rng.integers(0, 3, (n, 28, 28))
        arrays[f"{split}-images-idx3-ubyte"] = (images % 256).astype(np.uint8)
        arrays[f"{split}-labels-idx1-ubyte"] = rng.integers(0, 10, n).astype(np.uint8)
    return arrays


ARRAYS = synthetic()
CONTENT = {name: idx_bytes(array) for name, array in ARRAYS.items()}
GOOD = {name: gzipped(name, content) for name, content in CONTENT.items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    for name, stream in GOOD.items():
        (folder / f"{name}.gz").write_bytes(stream)
    return folder


def put(path: Path, content: bytes) -> None:
    """Overwrite in place: opening with truncation makes ext4 flush the old data to disk first
    (auto_da_alloc), 100 times slower, and the tests rewrite a file over a thousand times."""
    with open(path, "r+b") as f:
        f.write(content)
        f.truncate()


def check_load(folder: Path, name: str, damaged: bytes, same_content: bool) -> str:
    """Load with file ``name`` replaced by ``damaged``: either PyrozooError naming it, or the right data.

    ``same_content``: the damage was to the gzip layer, so data that loads must be exactly the original (the
    gzip checksum guards it); after damage to the IDX layer it need only have the right shapes and labels.
    """
    path = folder / f"{name}.gz"
    put(path, damaged)
    try:
        raw = data.load("fashion-mnist", data_dir=folder, download=False)
        data.prepare(raw)
    except PyrozooError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
        return f"refused ({type(e.__cause__).__name__})" if e.__cause__ else "refused"
    finally:
        put(path, GOOD[name])
    assert raw.x_train.shape == (N_TRAIN, 1, 28, 28) and raw.x_test.shape == (N_TEST, 1, 28, 28)
    assert raw.y_train.shape == (N_TRAIN,) and raw.y_test.shape == (N_TEST,)
    assert 0 <= min(raw.y_train.min(), raw.y_test.min()) and max(raw.y_train.max(), raw.y_test.max()) < 10
    if same_content:
        loaded = {
            "train-images-idx3-ubyte": raw.x_train[:, 0],
            "train-labels-idx1-ubyte": raw.y_train,
            "t10k-images-idx3-ubyte": raw.x_test[:, 0],
            "t10k-labels-idx1-ubyte": raw.y_test,
        }
        for key, array in ARRAYS.items():
            assert torch.equal(loaded[key], torch.from_numpy(array.astype(np.int64)).to(loaded[key].dtype))
    return "loaded"


def overwrite(stream: bytes, position: int, value: int) -> bytes:
    return stream[:position] + bytes([value]) + stream[position + 1 :]


def test_synthetic_files_are_huffman_coded_and_load(folder):
    for name, stream in GOOD.items():
        start = 10 + len(name) + 1  # the fixed header, then the zero-terminated name
        block_type = (stream[start] >> 1) & 0b11  # 0 stored, 1 fixed Huffman, 2 dynamic Huffman
        assert block_type == (2 if "images" in name else 1)
    assert check_load(folder, FILES[0], GOOD[FILES[0]], same_content=True) == "loaded"


@pytest.mark.parametrize("name", ["train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"])
def test_every_one_byte_corruption_and_truncation_of_a_labels_file(folder, name):
    """Exhaustive on the small labels files: each byte set to 4 other values, and every cut."""
    good = GOOD[name]
    outcomes = collections.Counter()
    for position in range(len(good)):
        for value in sorted({good[position] ^ 0x01, good[position] ^ 0x80, 0x00, 0xFF} - {good[position]}):
            outcomes[check_load(folder, name, overwrite(good, position, value), same_content=True)] += 1
    for length in range(len(good)):
        assert check_load(folder, name, good[:length], same_content=True).startswith("refused")
    # Each way a gzip stream breaks is among them: bad header or checksum, broken deflate data, cut short.
    assert {"refused (BadGzipFile)", "refused (error)", "refused (EOFError)"} <= set(outcomes), outcomes
    # Some damage is harmless: to the header's time stamp, OS byte and stored name.
    assert 0 < outcomes["loaded"] < outcomes.total() / 2, outcomes


@settings(
    max_examples=300,
    derandomize=True,  # the same cases on every run, so a failure repeats
    database=None,
    deadline=None,
    # The only function-scoped fixture is conftest's autouse seed, harmless to share across examples.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    name=st.sampled_from(FILES),
    layer=st.sampled_from(["gzip", "idx"]),
    damage=st.sampled_from(["byte", "cut"]),
    where=st.floats(0, 1, exclude_max=True),
    value=st.integers(0, 255),
)
def test_random_damage_loads_right_or_is_refused(folder, name, layer, damage, where, value):
    target = GOOD[name] if layer == "gzip" else CONTENT[name]
    position = int(where * len(target))
    if damage == "byte":
        damaged = overwrite(target, position, value)
    else:
        damaged = target[:position]
    if layer == "idx":
        damaged = gzipped(name, damaged)
    outcome = check_load(folder, name, damaged, same_content=layer == "gzip")
    if damage == "cut":
        assert outcome.startswith("refused")
