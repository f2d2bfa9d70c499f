"""Issue 33: no code runs from a file pyrozoo reads, and no run file is written through a link.

A hostile ``.pt`` file is a pickle whose unpickling creates a marker file. It is put in every place pyrozoo reads
a torch file (a run's checkpoint.pt, pruned.pt and pruned-laplace-*.pt, a grid cell's checkpoint, the
``--init-from`` file, a net's ``weights=`` file, ``predict --input``), through the command line and the Python
API, in torch's zip format and in the old plain-pickle format; the marker must never appear, and the command
must end in one line saying the file is not a plain tensor file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from clitools import assert_one_line_error, cli

from pyrozoo.errors import PyrozooError
from pyrozoo.init_from import load_state
from pyrozoo.io import LOCK_NAME, FolderLock
from pyrozoo.nets import create_net
from pyrozoo.runfolder import CHECKPOINT, PRUNED, read_checkpoint
from pyrozoo.torchfile import NotPlainTensors, load_tensors
from pyrozoo.train import Run

NOT_PLAIN = "is not a plain tensor file"
RUN = [
    "--data", "fashion-mnist-mini", "--net", "mlp", "--net-option", "hidden=(8,)", "--method", "bmr-th",
    "--epochs", "1", "--steps-per-epoch", "2", "--warmup-steps", "0", "--batch-size", "32", "--samples", "2",
    "--no-progress",
]  # fmt: skip


class _Marker:
    """Unpickling this creates the file at ``path``: what a hostile pickle would do, harmlessly."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _hostile(path: Path, marker: Path, *, legacy: bool = False) -> Path:
    """Write a code-running pickle to ``path`` (shaped like a checkpoint, so a check of its keys cannot be
    what stops it): zip format, or the old plain-pickle format with ``legacy``."""
    state = {key: _Marker(marker) for key in ("epoch", "step", "seconds", "guide", "model", "optimizer")}
    state.update({"batches": 0, "rng": 0, "net_state_dict": 0, "masks": 0, "laplace": 0, "source": 0})
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture
def finished(trained_pruned_run) -> Path:
    """A finished one-epoch run of RUN, pruned (conftest's, shared with test_faults; read-only: tests copy it)."""
    assert (trained_pruned_run / PRUNED).exists()
    return trained_pruned_run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    folder = tmp_path / "run"
    shutil.copytree(finished, folder)
    return folder


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "unpickling ran code from a file"


def _refused(capsys, *argv) -> str:
    return assert_one_line_error(*cli(capsys, *argv), NOT_PLAIN)


CHECKPOINT_READERS = {
    "prune": lambda run: ["prune", str(run), "--no-progress"],
    "resume": lambda run: ["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress"],
    "export": lambda run: ["export", str(run)],
    "predict": lambda run: ["predict", str(run), "--out", str(run.parent / "p.csv"), "--no-progress"],
    "uncertainty": lambda run: ["uncertainty", str(run), "--samples", "2", "--no-progress"],
    "sweep": lambda run: ["sweep", str(run), "--sparsities", "0.5", "--no-progress"],
}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
@pytest.mark.parametrize("command", CHECKPOINT_READERS)
def test_a_hostile_checkpoint_never_runs(capsys, run, marker, command, legacy):
    _hostile(run / CHECKPOINT, marker, legacy=legacy)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    line = _refused(capsys, *CHECKPOINT_READERS[command](run))
    assert str(run / CHECKPOINT) in line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


PRUNED_READERS = {
    "predict": lambda run: [
        "predict",
        str(run),
        "--pruned",
        "--out",
        str(run.parent / "p.csv"),
        "--no-progress",
    ],
    "uncertainty": lambda run: ["uncertainty", str(run), "--pruned", "--samples", "2", "--no-progress"],
}


@pytest.mark.parametrize("command", PRUNED_READERS)
def test_a_hostile_pruned_state_never_runs(capsys, run, marker, command):
    _hostile(run / PRUNED, marker)
    _refused(capsys, *PRUNED_READERS[command](run))


def test_a_hostile_laplace_pruned_state_never_runs(capsys, run, marker):
    from pyrozoo.posteriors import make_source

    _hostile(run / make_source("laplace-diag").file, marker)
    out = str(run.parent / "p.csv")
    _refused(capsys, "predict", str(run), "--pruned", "laplace-diag", "--out", out, "--no-progress")


def test_a_hostile_grid_cell_never_runs(capsys, tmp_path, marker):
    grid = ["--nets", "mlp", "--methods", "flat-ff", "--data", "fashion-mnist-mini", "--seeds", "0",
            "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "32", "--samples", "2",
            "--net-option", "hidden=(8,)", "--out", str(tmp_path / "grid"), "--no-progress"]  # fmt: skip
    code, _, err = cli(capsys, "compare", *grid)
    assert code == 0, err
    [cell] = [p.parent for p in (tmp_path / "grid").rglob(CHECKPOINT)]
    _hostile(cell / CHECKPOINT, marker)
    _refused(capsys, "compare", *grid)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_a_hostile_init_from_file_never_runs(capsys, tmp_path, marker, legacy):
    evil = _hostile(tmp_path / "evil.pt", marker, legacy=legacy)
    line = _refused(capsys, "train", *RUN, "--init-from", str(evil), "--out", str(tmp_path / "r"))
    assert "--trust-pickle" in line and "state_dict" in line
    assert not (tmp_path / "r").exists()


def test_a_net_saved_whole_opens_only_with_trust_pickle(capsys, tmp_path):
    net = create_net("mlp", in_channels=1, image_size=28, num_classes=10, hidden=(8,))
    torch.save(net, tmp_path / "whole.pt")
    with pytest.raises(NotPlainTensors, match="--trust-pickle"):
        load_state(tmp_path / "whole.pt")
    state = load_state(tmp_path / "whole.pt", trust_pickle=True)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    code, _, err = cli(capsys, "train", *RUN, "--init-from", str(tmp_path / "whole.pt"), "--trust-pickle",
                       "--out", str(tmp_path / "r"))  # fmt: skip
    assert code == 0, err


def test_the_python_api_refuses_hostile_files(run, tmp_path, marker):
    _hostile(run / CHECKPOINT, marker)
    for call in (lambda: read_checkpoint(run), lambda: Run.open(run), lambda: load_tensors(run / CHECKPOINT)):
        with pytest.raises(NotPlainTensors):
            call()
    evil = _hostile(tmp_path / "weights.pt", marker)
    with pytest.raises(PyrozooError, match=NOT_PLAIN):
        create_net("tv:resnet18", in_channels=1, image_size=32, num_classes=10, weights=str(evil))


def test_predict_input_refuses_a_hostile_file(capsys, run, tmp_path, marker):
    evil = _hostile(tmp_path / "inputs.pt", marker)
    _refused(
        capsys, "predict", str(run), "--input", str(evil), "--out", str(tmp_path / "p.csv"), "--no-progress"
    )


def test_every_run_file_loads_as_plain_tensors(finished, tmp_path):
    """What pyrozoo writes needs no unpickling of objects: the restricted loader opens it as it is."""
    for path in [finished / CHECKPOINT, finished / PRUNED]:
        assert isinstance(torch.load(path, weights_only=True), dict)


# --- links ----------------------------------------------------------------------------------------------------


def test_a_lock_that_is_a_link_is_refused_and_its_target_untouched(tmp_path):
    folder, target = tmp_path / "run", tmp_path / "precious.txt"
    folder.mkdir()
    target.write_bytes(b"do not truncate me\n")
    os.symlink(target, folder / LOCK_NAME)
    with pytest.raises(PyrozooError, match="not a regular file"):
        FolderLock(folder).acquire()
    assert target.read_bytes() == b"do not truncate me\n"


def test_a_lock_link_through_the_cli_changes_nothing(capsys, run, tmp_path):
    target = tmp_path / "precious.txt"
    target.write_bytes(b"keep\n")
    (run / LOCK_NAME).unlink(missing_ok=True)
    os.symlink(target, run / LOCK_NAME)
    assert_one_line_error(*cli(capsys, "prune", str(run), "--no-progress"), LOCK_NAME)
    assert target.read_bytes() == b"keep\n"


def test_a_lock_that_is_a_folder_is_refused(tmp_path):
    folder = tmp_path / "run"
    (folder / LOCK_NAME).mkdir(parents=True)
    with pytest.raises(PyrozooError, match="not a regular file"):
        FolderLock(folder).acquire()


def test_run_files_that_are_links_are_replaced_not_written_through(capsys, run, tmp_path):
    """Every other run file is written beside its place and renamed onto it: a link there is replaced, and the
    file it pointed to keeps its bytes (a resume rewrites config.json, metrics.csv and checkpoint.pt)."""
    targets = {}
    for name in ("config.json", "metrics.csv", "scales.csv"):
        target = tmp_path / f"precious-{name}"
        target.write_bytes((run / name).read_bytes())
        (run / name).unlink()
        os.symlink(target, run / name)
        targets[name] = target.read_bytes()
    code, _, err = cli(capsys, "train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress")
    assert code == 0, err
    for name, content in targets.items():
        assert not (run / name).is_symlink()
        assert (tmp_path / f"precious-{name}").read_bytes() == content


def test_a_newer_pickle_protocol_is_refused_unless_trusted(tmp_path, marker):
    """torch's restricted loader cannot read pickle protocol 4+: such a file (a plain state_dict saved with
    pickle_protocol=4, or a hostile pickle) is refused as not plain, and opens only with trust_pickle."""
    import pickle

    net = create_net("mlp", in_channels=1, image_size=28, num_classes=10, hidden=(8,))
    torch.save(net.state_dict(), tmp_path / "p4.pt", pickle_protocol=4)
    with (tmp_path / "evil4.pt").open("wb") as f:
        pickle.dump({"x": _Marker(marker)}, f, protocol=4)
    for name in ("p4.pt", "evil4.pt"):
        with pytest.raises(NotPlainTensors, match="protocol 4 or newer"):
            load_tensors(tmp_path / name)
    state = load_state(tmp_path / "p4.pt", trust_pickle=True)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
