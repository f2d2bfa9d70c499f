import contextlib
import io
import shutil
from pathlib import Path

import pyro
import pytest
import torch

import pyrozoo  # noqa: F401
from pyrozoo.models import BayesianModel
from pyrozoo.nets import create_net


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One torch thread: the tests are small, and on a small, busy machine (CI has 2 cores) two threads
    fighting other work can make a step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    pyro.set_rng_seed(0)
    with pyro.validation_enabled(True):
        yield


@pytest.fixture
def float64():
    """Double precision as the default dtype (tests that compare with exact forms at 1e-6 or finer), restored
    after."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.fixture
def tiny_lenet_model():
    net = create_net("lenet", in_channels=1, image_size=32, num_classes=10, channels=(2, 3, 4), hidden=5)
    return BayesianModel(net)


@pytest.fixture
def tiny_mlp_model():
    return BayesianModel(create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(5, 4)))


@pytest.fixture
def tiny_batch():
    x = torch.randn(6, 1, 4, 4)
    y = torch.randint(0, 3, (6,))
    return x, y


# A tiny MAP run: an MLP trained one epoch of 20 steps on the bundled data set.
TINY_MAP_RUN = ["--net", "mlp", "--net-option", "hidden=(16,16)", "--data", "fashion-mnist-mini",
                "--steps-per-epoch", "20", "--no-progress", "--method", "flat-map", "--epochs", "1"]  # fmt: skip
# A tiny flat-ff run (a posterior to prune): the default MLP trained one epoch of 3 steps, as test_cli's TINY.
TINY_FF_RUN = ["--data", "fashion-mnist-mini", "--net", "mlp", "--steps-per-epoch", "3", "--batch-size", "32",
               "--samples", "2", "--no-progress", "--method", "flat-ff", "--epochs", "1"]  # fmt: skip

# A tiny BMR run, pruned after training (files of every kind a run holds): the MLP of test_untrusted_files' RUN.
TINY_PRUNED_RUN = [
    "--data", "fashion-mnist-mini", "--net", "mlp", "--net-option", "hidden=(8,)", "--method", "bmr-th",
    "--epochs", "1", "--steps-per-epoch", "2", "--warmup-steps", "0", "--batch-size", "32", "--samples", "2",
    "--no-progress",
]  # fmt: skip


def _trained(tmp_path_factory, name: str, argv: list[str], *after: list[str]) -> Path:
    """``pyrozoo train *argv`` into a fresh folder, then each command of ``after`` on it (``RUN``: the folder),
    quietly; a failure shows what the command said."""
    from pyrozoo.cli import main

    folder = tmp_path_factory.mktemp("trained") / name
    for command in (["train", *argv, "--out", "RUN"], *after):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            code = main([str(folder) if arg == "RUN" else arg for arg in command])
        assert code == 0, err.getvalue()
    return folder


@pytest.fixture(scope="session")
def trained_map_run(tmp_path_factory) -> Path:
    """The tiny MAP run, trained once per session. Read-only: a test that writes into it takes ``map_run``."""
    return _trained(tmp_path_factory, "map", TINY_MAP_RUN)


def _copied(trained: Path, folder: Path, monkeypatch) -> Path:
    """A copy of a session's run at ``folder``, with the folder above it the working directory."""
    monkeypatch.chdir(folder.parent)
    return Path(shutil.copytree(trained, folder))


@pytest.fixture
def map_run(trained_map_run, tmp_path, monkeypatch) -> Path:
    """A copy of the tiny MAP run at ``tmp_path/map``, with ``tmp_path`` the working directory."""
    return _copied(trained_map_run, tmp_path / "map", monkeypatch)


@pytest.fixture(scope="session")
def trained_ff_run(tmp_path_factory) -> Path:
    """The tiny flat-ff run, trained once per session. Read-only: a test that writes into it takes ``ff_run``."""
    return _trained(tmp_path_factory, "ff", TINY_FF_RUN)


@pytest.fixture
def ff_run(trained_ff_run, tmp_path, monkeypatch) -> Path:
    """A copy of the tiny flat-ff run at ``tmp_path/run``, with ``tmp_path`` the working directory."""
    return _copied(trained_ff_run, tmp_path / "run", monkeypatch)


@pytest.fixture(scope="session")
def trained_pruned_run(tmp_path_factory) -> Path:
    """The tiny BMR run, trained and pruned once per session (checkpoint.pt and pruned.pt). Read-only: tests copy
    it."""
    return _trained(tmp_path_factory, "pruned", TINY_PRUNED_RUN, ["prune", "RUN", "--no-progress"])
