"""The reliability suite (issue 14): kill a real ``python -m pyrozoo.cli train`` at chosen points and check that
resuming gives the run an uninterrupted one gives, bit for bit; two real processes on one run folder; and a
table of bad inputs, each held to the exit-code contract (2 and one line on stderr; 1 a diverged loss; 3 a bug).

The kills use the fault points of ``tests/faults.py`` (``PYROZOO_FAULT=POINT@N``: SIGKILL at the N-th time the
process gets there). A subprocess costs seconds of imports, so one kill runs by default and the rest of the
table is marked slow: ``python -m pytest tests/test_reliability.py -m "slow or not slow"`` runs them all.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from clitools import assert_one_line_error, cli

from pyrozoo import bmr, compare, data
from pyrozoo.bind import bind
from pyrozoo.cli import BUG_EXIT_CODE, main
from pyrozoo.config import TrainConfig
from pyrozoo.elbo import negative_elbo
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import make_guide
from pyrozoo.io import hold_folder
from pyrozoo.methods import METHODS
from pyrozoo.models import BayesianModel
from pyrozoo.nets import create_net
from pyrozoo.runfolder import BMR_LOG, CHECKPOINT, CONFIG, METRICS, PRUNED, SCALES
from pyrozoo.steps import STEPS, svi_step
from pyrozoo.train import Run

ROOT = Path(__file__).resolve().parents[1]
# A tiny BMR run: 3 epochs of 3 steps, a pass after epochs 1 and 2, evaluation after each.
RUN = [
    "--data", "fashion-mnist-mini", "--net", "mlp", "--net-option", "hidden=(16,)", "--method", "bmr-th",
    "--warmup-steps", "0", "--epochs", "3", "--steps-per-epoch", "3", "--batch-size", "32", "--samples", "2",
    "--no-progress",
]  # fmt: skip
TINY = ["--data", "fashion-mnist-mini", "--net", "mlp", "--net-option", "hidden=(16,)", "--steps-per-epoch", "3",
        "--batch-size", "32", "--samples", "2", "--no-progress"]  # fmt: skip
VIT = [arg if arg != "mlp" else "vit" for arg in TINY if arg not in ("--net-option", "hidden=(16,)")]


# --- helpers ------------------------------------------------------------------------------------------------


def pyrozoo(*argv: str, cwd: Path, fault: str | None = None, wait: bool = True):
    """``python -m pyrozoo.cli ARGV`` in a subprocess that imports this checkout, optionally with a fault
    (tests/faults.py runs it then)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYROZOO_FAULT", None)
    if fault:
        env["PYROZOO_FAULT"] = fault
    runner = [str(ROOT / "tests" / "faults.py")] if fault else ["-m", "pyrozoo.cli"]
    command = [sys.executable, *runner, *argv]
    if not wait:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def svi_on(monkeypatch, loss) -> None:
    """Runs that train by SVI take their steps on ``loss`` (the seam a failing loss comes in by): a training
    step registered in its place."""
    step = dataclasses.replace(STEPS["svi"], step=functools.partial(svi_step, loss=loss))
    monkeypatch.setitem(STEPS, "svi", step)


def same(a, b, where: str = "") -> None:
    """Equal, bit for bit, except wall-clock timings (keys ending in "seconds": only whether they are NaN)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            if isinstance(key, str) and key.endswith("seconds"):
                nan = lambda v: isinstance(v, float) and math.isnan(v)  # noqa: E731
                assert nan(a[key]) == nan(b[key]), f"{where}/{key}"
            else:
                same(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


def assert_same_run(folder: Path, straight: Path) -> None:
    """The run in ``folder`` is the straight run: checkpoint tensors and rows, metrics.csv, scales.csv."""
    a = torch.load(folder / CHECKPOINT, weights_only=False)
    b = torch.load(straight / CHECKPOINT, weights_only=False)
    same(a, b, "checkpoint")
    ma, mb = pd.read_csv(folder / METRICS), pd.read_csv(straight / METRICS)
    timings = [c for c in ma.columns if c.endswith("seconds")]
    assert list(ma.columns) == list(mb.columns)
    pd.testing.assert_frame_equal(ma.drop(columns=timings), mb.drop(columns=timings), check_exact=True)
    assert ma[timings].isna().equals(mb[timings].isna())
    assert (folder / SCALES).read_text() == (straight / SCALES).read_text()
    assert (folder / BMR_LOG).read_text() == (straight / BMR_LOG).read_text()
    assert not [p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".old"))]  # leftovers removed


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run, made by a real subprocess as the faulted ones are."""
    cwd = tmp_path_factory.mktemp("straight")
    done = pyrozoo("train", *RUN, "--out", "run", cwd=cwd)
    assert done.returncode == 0, done.stderr
    return cwd / "run"


# --- kills at chosen points, then resume ------------------------------------------------------------------

# (fault point, which hit, the committed epoch the kill leaves). Writes of a fresh 3-epoch run, in order:
# config.json twice, then per epoch bmr.csv (after a pass), metrics.csv and checkpoint.pt, with scales.csv before
# the last two after epoch 3.
KILLS = [
    pytest.param("metrics", 2, 1, id="between-metrics-and-checkpoint-renames"),
    pytest.param("metrics", 3, 2, id="between-renames-of-the-last-epoch", marks=pytest.mark.slow),
    pytest.param("step", 4, 1, id="mid-step", marks=pytest.mark.slow),
    pytest.param("bmr", 2, 1, id="mid-bmr-pass", marks=pytest.mark.slow),
    pytest.param("eval", 2, 1, id="mid-evaluation", marks=pytest.mark.slow),
    pytest.param("write", 8, 1, id="checkpoint-written-not-renamed", marks=pytest.mark.slow),
    pytest.param("write", 9, 2, id="scales-written-not-renamed", marks=pytest.mark.slow),
    pytest.param("commit", 1, 1, id="after-a-commit", marks=pytest.mark.slow),
    pytest.param("write", 1, 0, id="config-written-not-renamed", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("point, hit, committed", KILLS)
def test_a_killed_run_resumes_to_the_uninterrupted_run(tmp_path, straight, point, hit, committed):
    killed = pyrozoo("train", *RUN, "--out", "run", cwd=tmp_path, fault=f"{point}@{hit}")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    run = tmp_path / "run"
    # Whatever the files say, the committed epoch is the checkpoint's, and a grid reads "finished" from it.
    assert compare.finished_epochs(run) == committed
    if committed:
        assert list(compare.committed_metrics(run)["epoch"]) == list(range(1, committed + 1))
        again = pyrozoo("train", "--out", "run", "--resume", "--no-progress", cwd=tmp_path)
    else:  # nothing committed: the same command starts the run again in the same folder
        again = pyrozoo("train", *RUN, "--out", "run", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_same_run(run, straight)


@pytest.mark.slow
def test_two_kills_in_a_row_still_resume_to_the_uninterrupted_run(tmp_path, straight):
    assert pyrozoo("train", *RUN, "--out", "run", cwd=tmp_path, fault="bmr@2").returncode == -signal.SIGKILL
    resumed = pyrozoo("train", "--out", "run", "--resume", "--no-progress", cwd=tmp_path, fault="metrics@1")
    assert resumed.returncode == -signal.SIGKILL  # killed again, between the renames of epoch 2 (its first)
    assert pyrozoo("train", "--out", "run", "--resume", "--no-progress", cwd=tmp_path).returncode == 0
    assert_same_run(tmp_path / "run", straight)


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_two_real_processes_on_one_out(tmp_path):
    """The first process holds the folder (stopped mid-step by its fault point); the second exits 2 naming it,
    and writes nothing; once the first is killed, the folder is free."""
    first = pyrozoo(
        "train", *TINY, "--epochs", "1", "--out", "run", cwd=tmp_path, fault="step:stop", wait=False
    )
    try:
        deadline = time.monotonic() + 300
        while not _stopped(first.pid):
            assert first.poll() is None and time.monotonic() < deadline, "the first process did not get going"
            time.sleep(0.2)
        config = (tmp_path / "run" / CONFIG).read_text()
        lenet = ["--data", "fashion-mnist-mini", "--net", "lenet", "--steps-per-epoch", "3", "--no-progress"]
        second = pyrozoo("train", *lenet, "--epochs", "1", "--out", "run", cwd=tmp_path)
        assert second.returncode == 2 and second.stdout == ""
        assert len(second.stderr.splitlines()) == 1 and second.stderr.startswith("pyrozoo: error:")
        assert f"in use by process {first.pid}" in second.stderr
        assert (tmp_path / "run" / CONFIG).read_text() == config  # still the first one's run
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    with hold_folder(tmp_path / "run"):  # free again
        assert json.loads(config)["config"]["net"] == "mlp"


# --- a run folder is consistent or not finished (in process) -------------------------------------------------


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Work in tmp_path, with no data, cache or network but the bundled subset."""
    monkeypatch.chdir(tmp_path)
    for name in ("PYROZOO_DATA", "PYROZOO_CACHE"):
        monkeypatch.setenv(name, str(tmp_path / "none"))
    monkeypatch.delenv("PYROZOO_FAULT", raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", str(tmp_path / "none"))
    monkeypatch.setattr(
        data, "_download", lambda name, root: (_ for _ in ()).throw(ConnectionError("offline"))
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 2-epoch tiny flat-ff run, made once; tests copy it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    code = main(["train", *TINY, "--method", "flat-ff", "--epochs", "2", "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def test_metrics_one_epoch_ahead_of_the_checkpoint_is_not_finished(capsys, tmp_path, run):
    """The issue's grid case: killed between the last epoch's two renames. The checkpoint commits epoch 1, so
    the run is unfinished, collect() and a resume see one row, and the resume mends metrics.csv."""
    ahead = pd.read_csv(run / METRICS)
    state = torch.load(run / CHECKPOINT, weights_only=False)
    shutil.rmtree(run)
    assert main(["train", *TINY, "--method", "flat-ff", "--epochs", "1", "--out", str(run)]) == 0
    ahead.to_csv(run / METRICS, index=False)  # epoch 2's row, renamed before its checkpoint was
    config = json.loads((run / CONFIG).read_text())
    config["config"]["epochs"] = 2
    (run / CONFIG).write_text(json.dumps(config))
    capsys.readouterr()
    assert compare.finished_epochs(run) == 1
    assert list(compare.committed_metrics(run)["epoch"]) == [1]
    assert compare.run_state(run, bind(TrainConfig.from_record(config["config"])).config) == "resume"
    code, _, err = cli(capsys, "train", "--out", str(run), "--resume", "--no-progress")
    assert code == 0, err
    resumed = torch.load(run / CHECKPOINT, weights_only=False)
    same({k: resumed[k] for k in ("guide", "model", "optimizer", "history")},
         {k: state[k] for k in ("guide", "model", "optimizer", "history")})  # fmt: skip


def test_a_folder_from_before_checkpoints_held_the_metrics_is_read(capsys, run):
    """Old run folders (no history in checkpoint.pt): the checkpoint's epoch is the committed one, and the
    metrics rows come from metrics.csv up to it."""
    state = torch.load(run / CHECKPOINT, weights_only=False)
    history = state.pop("history")
    state["epoch"], state["step"] = 1, 3  # as if killed between the renames of epoch 2
    torch.save(state, run / CHECKPOINT)
    assert compare.finished_epochs(run) == 1
    rows = compare.committed_metrics(run)
    assert list(rows["epoch"]) == [1] and rows["elbo"][0] == history[0]["elbo"]
    with Run.open(run, log=lambda text: None) as opened:
        assert opened.epoch == 1 and len(opened.history) == 1
    (run / METRICS).unlink()  # the rows the checkpoint has trained are gone: refused, saying what to do
    with pytest.raises(PyrozooError, match="does not hold one row for each of the 1 epochs"):
        Run.open(run, log=lambda text: None)


def test_a_run_that_cannot_write_its_scales_is_not_finished(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("posterior_scales broke")

    monkeypatch.setattr("pyrozoo.checkpoint.posterior_scales", broken)
    config = TrainConfig(net="mlp", data="fashion-mnist-mini", method="flat-ff", epochs=2, steps_per_epoch=2,
                         batch_size=32, samples=1, net_options={"hidden": (8,)})  # fmt: skip
    with pytest.raises(RuntimeError), Run(config, tmp_path / "run", log=print) as run:
        run.train(progress=False)
    assert compare.finished_epochs(tmp_path / "run") == 1  # the last epoch was not committed
    assert len(pd.read_csv(tmp_path / "run" / METRICS)) == 1 and not (tmp_path / "run" / SCALES).exists()


def test_a_corrupt_metrics_csv_of_a_new_folder_is_mended_on_resume(capsys, run):
    (run / METRICS).write_bytes(b"\x00\xff garbage")
    code, _, err = cli(capsys, "train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress")
    assert code == 0, err
    assert list(pd.read_csv(run / METRICS)["epoch"]) == [1, 2, 3]


# --- derived files ---------------------------------------------------------------------------------------------


def test_export_refuses_a_stale_pruned_state_and_records_its_source(capsys, run):
    assert cli(capsys, "prune", str(run), "--margin=-1e9")[0] == 0
    pruned = torch.load(run / PRUNED, weights_only=False)
    assert (pruned["source"]["epoch"], pruned["source"]["step"]) == (2, 6)
    code, out, err = cli(capsys, "export", str(run), "--repeats", "1")
    assert code == 0, err
    summary = json.loads((run / "export" / "summary.json").read_text())
    assert summary["source"] == {"state": "pruned.pt", **pruned["source"]}

    assert cli(capsys, "train", "--out", str(run), "--resume", "--epochs", "3", "--no-progress")[0] == 0
    before = (run / "export" / "sparse_net.pt").read_bytes()
    assert_one_line_error(
        *cli(capsys, "export", str(run), "--repeats", "1"),
        "pruned.pt was pruned from the checkpoint of epoch 2, step 6", "epoch 3, step 9", "prune again",
        "delete",
    )  # fmt: skip
    assert (run / "export" / "sparse_net.pt").read_bytes() == before  # the previous export is untouched
    (run / PRUNED).unlink()
    assert cli(capsys, "export", str(run), "--repeats", "1")[0] == 0
    source = json.loads((run / "export" / "summary.json").read_text())["source"]
    assert (source["state"], source["epoch"], source["step"]) == ("checkpoint", 3, 9)


def test_a_pruned_state_from_a_retrained_run_is_stale_too(capsys, run, trained):
    assert cli(capsys, "prune", str(run))[0] == 0
    shutil.copy(trained / CHECKPOINT, run / CHECKPOINT)  # same epoch and step, other bytes: another training
    state = torch.load(run / CHECKPOINT, weights_only=False)
    state["seconds"] += 1.0
    torch.save(state, run / CHECKPOINT)
    assert_one_line_error(*cli(capsys, "export", str(run), "--repeats", "1"), "written again", "prune again")


# --- resume after a NaN, with --override lr -----------------------------------------------------------------


def test_a_diverged_run_resumes_with_a_smaller_lr_by_the_command_its_message_gives(
    capsys, tmp_path, monkeypatch
):
    calls = []

    def nan_in_epoch_two(*args, **kwargs):
        calls.append(1)
        loss = negative_elbo(*args, **kwargs)
        return loss * float("nan") if len(calls) == 5 else loss

    with monkeypatch.context() as patched:
        svi_on(patched, nan_in_epoch_two)
        code, out, err = cli(capsys, "train", *TINY, "--method", "flat-ff", "--epochs", "3", "--out", "run")
    assert code == 1 and "Traceback" not in err
    command = "pyrozoo train --out run --resume --lr 0.0001 --override lr"
    assert command in err.splitlines()[-1]

    # Without the opt-in, a changed lr stays an error that names the way to do it.
    assert_one_line_error(
        *cli(capsys, "train", "--out", "run", "--resume", "--lr", "0.0001"), "--override lr"
    )
    code, out, err = cli(capsys, *command.split()[1:], "--no-progress")
    assert code == 0, err
    assert "--override: lr 0.001 -> 0.0001 after epoch 1" in err
    record = json.loads((tmp_path / "run" / CONFIG).read_text())
    assert record["config"]["lr"] == 0.0001
    assert record["overrides"] == [{"option": "lr", "from": 0.001, "to": 0.0001, "epoch": 1, "step": 3}]
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)
    # flat-ff's lr is in weight units: each group at the new lr over its layer's prior scale (0.1 hidden, 1 head)
    assert state["epoch"] == 3 and _lrs(state["optimizer"]["param_groups"]) == [0.0001, 0.001]
    with Run.open(tmp_path / "run", log=lambda text: None) as reopened:  # the new lr is the run's now
        assert _lrs(reopened.optimizer.param_groups) == [0.0001, 0.001]


def _lrs(groups) -> list[float]:
    assert all(math.isclose(g["lr"], 0.0001 * g["lr_scale"]) for g in groups)
    return sorted({round(g["lr"], 12) for g in groups})


def test_a_nan_in_the_first_epoch_says_to_start_again(capsys, monkeypatch):
    svi_on(monkeypatch, lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    code, _, err = cli(capsys, "train", *TINY, "--epochs", "1", "--out", "run")
    assert code == 1 and "nothing to resume" in err and "--lr 0.0001" in err


# --- tiered-ff --local-scales --------------------------------------------------------------------------------


def test_local_scales_train_to_the_end_and_prune_by_shrinkage(capsys, tmp_path):
    code, _, err = cli(capsys, "train", *TINY, "--method", "tiered-ff", "--local-scales", "--epochs", "1",
                       "--out", "run")  # fmt: skip
    assert code == 0, err
    scales = pd.read_csv(tmp_path / "run" / SCALES)
    assert len(scales) == 2 and (scales["min_scale"] > 0).all()  # hidden (16) and head
    assert compare.finished_epochs(tmp_path / "run") == 1
    code, out, err = cli(capsys, "prune", "run", "--rule", "shrinkage", "--threshold", "1e9",
                         "--rule-option", "allow_empty=true")  # fmt: skip
    assert code == 0, err
    assert "pruned fraction 1.0000" in out  # every row's scale is below 1e9 (and emptying was asked for)


# --- crashes are not user errors ------------------------------------------------------------------------------


def test_a_bug_keeps_its_traceback_and_exits_3(capsys, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(Run, "train", bug)
    code, out, err = cli(capsys, "train", *TINY, "--epochs", "1", "--out", "run")
    assert code == BUG_EXIT_CODE == 3
    assert "Traceback" in err and "ZeroDivisionError: a bug" in err
    assert "bug in pyrozoo" in err.splitlines()[-1] and "report" in err.splitlines()[-1]


# --- a guide from another model -------------------------------------------------------------------------------


def _model(kind: str) -> BayesianModel:
    if kind == "lenet":
        return BayesianModel(create_net("lenet", in_channels=1, image_size=32, num_classes=10, channels=(2, 3, 4),
                                        hidden=5))  # fmt: skip
    prior = METHODS["tiered-ff"].prior if kind == "mlp-tiered" else METHODS["flat-ff"].prior
    hidden = (6, 4) if kind == "mlp-wider" else (5, 4)
    return BayesianModel(
        create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=hidden), prior=prior
    )


FOREIGN = [("mlp", "mlp-wider", "shape"), ("mlp", "lenet", "no site"), ("mlp", "mlp-tiered", "no site"),
           ("mlp-tiered", "mlp", "no site")]  # fmt: skip
USES = {
    "prune": lambda m, g: bmr.prune(m, g),
    "prune-units": lambda m, g: bmr.prune_units(m, g),
    "reduce": lambda m, g: bmr.reduce(m, g, "spike-and-slab", units=True),
    "rebuild": lambda m, g: bmr.rebuild(m, g),
}


@pytest.mark.parametrize("use", list(USES))
@pytest.mark.parametrize("trained_on, used_on, words", FOREIGN)
def test_a_guide_of_another_model_is_one_error(trained_on, used_on, words, use):
    x, y = torch.randn(2, 1, 4, 4), torch.tensor([0, 1])
    guide = make_guide("meanfield", _model(trained_on), x, y, 2)
    model = _model(used_on)
    masks = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PyrozooError, match=f"does not belong to this model.*{words}"):
        USES[use](model, guide)
    same(dict(model.state_dict()), masks)  # nothing was changed before the refusal
    USES[use](_model(trained_on), guide)  # its own model is fine


# --- the bad-input table: exit code 2 and one line --------------------------------------------------------------


def _truncate(path: Path, keep: float = 0.5) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def _edit_config(key, value):
    def edit(run: Path) -> None:
        record = json.loads((run / CONFIG).read_text())
        record["config"][key] = value
        (run / CONFIG).write_text(json.dumps(record))

    return edit


def _old_folder_with_bad_metrics(run: Path) -> None:
    state = torch.load(run / CHECKPOINT, weights_only=False)
    del state["history"]
    torch.save(state, run / CHECKPOINT)
    (run / METRICS).write_bytes(b'epoch,step\n1,3\n"2,6\n')  # an unclosed quote


def _pruned(run: Path) -> None:
    assert main(["prune", str(run)]) == 0


def _results(text: bytes):
    def write(run: Path) -> None:
        grid = run.parent / "grid"
        grid.mkdir()
        (grid / "results.csv").write_bytes(text)

    return write


GOOD_RESULTS = (
    b"data,net,method,seed,epoch,step,accuracy\n"
    b"fashion-mnist-mini,mlp,flat-ff,0,1,3,0.5\nfashion-mnist-mini,mlp,flat-ff,0,2,6,0.6\n"
)

# (id, how to spoil the trained run folder or None, the command (RUN = the run folder, GRID = a grid folder),
# words the one line must hold)
BAD_INPUTS = [
    ("checkpoint-truncated/resume", lambda r: _truncate(r / CHECKPOINT), ["train", "--out", "RUN", "--resume"],
     ["checkpoint.pt is corrupt or truncated", "delete"]),
    ("checkpoint-truncated/prune", lambda r: _truncate(r / CHECKPOINT), ["prune", "RUN"], ["checkpoint.pt"]),
    ("checkpoint-truncated/export", lambda r: _truncate(r / CHECKPOINT, 0.9), ["export", "RUN"], ["checkpoint.pt"]),
    ("checkpoint-random-bytes", lambda r: (r / CHECKPOINT).write_bytes(random.Random(0).randbytes(300)),
     ["prune", "RUN"],
     ["checkpoint.pt is corrupt"]),
    ("checkpoint-empty", lambda r: (r / CHECKPOINT).write_bytes(b""), ["train", "--out", "RUN", "--resume"],
     ["checkpoint.pt is corrupt"]),
    ("checkpoint-not-a-run", lambda r: torch.save({"epoch": 1}, r / CHECKPOINT), ["prune", "RUN"],
     ["not a pyrozoo checkpoint"]),
    ("checkpoint-of-another-net", lambda r: torch.save(
        {**torch.load(r / CHECKPOINT, weights_only=False), "guide": {"x": torch.zeros(1)}}, r / CHECKPOINT),
     ["train", "--out", "RUN", "--resume"], ["does not fit the run", "config.json"]),
    ("config-truncated/resume", lambda r: _truncate(r / CONFIG), ["train", "--out", "RUN", "--resume"],
     ["config.json is corrupt", "delete"]),
    ("config-truncated/prune", lambda r: _truncate(r / CONFIG), ["prune", "RUN"], ["config.json is corrupt"]),
    ("config-truncated/export", lambda r: _truncate(r / CONFIG), ["export", "RUN"], ["config.json is corrupt"]),
    ("config-not-json", lambda r: (r / CONFIG).write_bytes(b"\xff\xfe\x00"), ["prune", "RUN"],
     ["config.json is corrupt"]),
    ("config-wrong-type", _edit_config("epochs", "two"), ["train", "--out", "RUN", "--resume"],
     ["config.json is corrupt", "epochs"]),
    ("config-unknown-key", _edit_config("colour", "red"), ["prune", "RUN"], ["config.json is corrupt", "colour"]),
    ("metrics-corrupt-old-folder", _old_folder_with_bad_metrics, ["train", "--out", "RUN", "--resume"],
     ["metrics.csv is corrupt"]),
    ("pruned-truncated", lambda r: (_pruned(r), _truncate(r / PRUNED)), ["export", "RUN"],
     ["pruned.pt is corrupt or truncated", "prune again"]),
    ("pruned-random-bytes", lambda r: (r / PRUNED).write_bytes(random.Random(1).randbytes(100)), ["export", "RUN"],
     ["pruned.pt is corrupt"]),
    ("results-truncated-mid-row", _results(GOOD_RESULTS[:-12]), ["plot", "GRID"], ["results.csv is corrupt"]),
    ("results-truncated-mid-name", _results(GOOD_RESULTS[:-30]), ["plot", "GRID"], ["results.csv is corrupt"]),
    ("results-random-bytes", _results(random.Random(2).randbytes(200)), ["plot", "GRID"], ["results.csv is corrupt"]),
    ("results-empty", _results(b""), ["plot", "GRID"], ["results.csv is corrupt"]),
    ("results-no-columns", _results(b"a,b\n1,2\n"), ["plot", "GRID"], ["results.csv is corrupt", "method"]),
    ("net-option-depth-negative", None, ["train", *VIT, "--net-option", "preset=tiny",
     "--net-option", "depth=-2", "--out", "NEW"], ["net 'vit' cannot be built", "depth=-2"]),
    ("net-option-channels-fractional", None, ["train", *TINY, "--net", "lenet", "--net-option",
     "channels=(1.5,2,3)", "--out", "NEW"], ["net 'lenet' cannot be built", "channels=(1.5, 2, 3)"]),
    ("net-option-patch-size-0", None, ["train", *VIT, "--net-option", "preset=tiny",
     "--net-option", "patch_size=0", "--out", "NEW"], ["net 'vit' cannot be built", "patch_size=0"]),
    ("net-option-num-classes", None, ["train", *TINY, "--net-option", "num_classes=3", "--out", "NEW"],
     ["num_classes", "the data"]),
    ("net-too-large-for-the-images", None, ["compress", "lenet", "--weights", "NEW", "--data", "fashion-mnist-mini",
     "--pad-to", "28"], ["net 'lenet' cannot be built for this data's 28x28 images", "compress --pad-to"]),
    ("net-option-unknown", None, ["train", *TINY, "--net-option", "depth=2", "--out", "NEW"],
     ["net 'mlp' takes no option 'depth'; its options: hidden, dropout"]),
    ("net-option-hidden-fractional", None, ["train", *TINY, "--net-option", "hidden=(1.5,)", "--out", "NEW"],
     ["net 'mlp' cannot be built"]),
    ("batch-size-over-the-training-set", None, ["train", *TINY, "--batch-size", "100000", "--out", "NEW"],
     ["--batch-size 100000", "4000", "at most"]),
    ("lr-inf", None, ["train", *TINY, "--lr", "inf", "--out", "NEW"], ["--lr", "finite"]),
    ("lr-units-unknown", None, ["train", *TINY, "--lr-units", "metres", "--out", "NEW"],
     ["--lr-units 'metres'", "weight", "latent"]),
    ("lr-units-weight-for-ivon", None, ["train", *TINY, "--method", "ivon", "--lr-units", "weight", "--out", "NEW"],
     ["--lr-units weight", "guide 'ivon'", "--lr-units latent"]),
    ("tau0-inf", None, ["train", *TINY, "--method", "tiered-ff", "--tau0", "inf", "--out", "NEW"], ["finite"]),
    ("prune-margin-nan", None, ["prune", "RUN", "--margin", "nan"], ["--margin", "finite"]),
    ("prune-rule-option-margin-nan", None, ["prune", "RUN", "--rule-option", "margin=float('nan')"],
     ["margin"]),
    ("prune-threshold-nan", None, ["prune", "RUN", "--rule", "shrinkage", "--threshold", "nan"], ["finite"]),
    ("resume-changes-lr", None, ["train", "--out", "RUN", "--resume", "--lr", "1"], ["--lr", "--override lr"]),
    ("resume-changes-seed", None, ["train", "--out", "RUN", "--resume", "--seed", "3"], ["--seed"]),
    ("resume-changes-batch-size", None, ["train", "--out", "RUN", "--resume", "--batch-size", "7"],
     ["--batch-size"]),
    ("override-seed", None, ["train", "--out", "RUN", "--resume", "--seed", "3", "--override", "seed"],
     ["--override seed", "only lr"]),
    ("override-without-value", None, ["train", "--out", "RUN", "--resume", "--override", "lr"], ["--lr too"]),
    ("override-without-resume", None, ["train", *TINY, "--lr", "0.1", "--override", "lr", "--out", "NEW"],
     ["--resume"]),
    ("new-run-in-a-run-folder", None, ["train", *TINY, "--out", "RUN"], ["--resume"]),
    ("export-of-nothing", None, ["export", "NEW"], ["holds no run"]),
    ("resume-shortens", None, ["train", "--out", "RUN", "--resume", "--epochs", "1"], ["would shorten it"]),
    ("bmr-with-a-point-mass", None, ["train", *TINY, "--method", "bmr-th", "--guide", "autodelta", "--out", "NEW"],
     ["point mass"]),
    ("tiered-tau0-zero", None, ["train", *TINY, "--method", "tiered-ff", "--tau0", "0", "--out", "NEW"],
     ["tau0 must be positive"]),
    ("flat-hidden-scale-negative", None, ["train", *TINY, "--prior-option", "hidden_scale=-1", "--out", "NEW"],
     ["hidden_scale must be positive"]),
    ("prune-alias-and-option-disagree", None, ["prune", "RUN", "--margin", "1", "--rule-option", "margin=2"],
     ["--margin and rule option margin disagree"]),
    ("horseshoe-tau0-zero", None, ["prune", "RUN", "--rule", "horseshoe", "--rule-option", "tau0=0"],
     ["horseshoe: tau0 and lr must be positive"]),
    ("horseshoe-no-samples", None, ["prune", "RUN", "--rule", "horseshoe", "--rule-option", "samples=0"],
     ["samples and steps at least 1"]),
    ("shrinkage-no-samples", None, ["prune", "RUN", "--rule", "shrinkage", "--rule-option", "samples=0"],
     ["samples must be at least 1"]),
    ("horseshoe-no-steps", None, ["prune", "RUN", "--rule", "horseshoe", "--rule-option", "steps=0"],
     ["samples and steps at least 1"]),
    ("rule-option-margin-inf", None, ["prune", "RUN", "--rule-option", "margin=inf"], ["margin", "finite"]),
    ("guide-option-init-scale-overflows", None, ["train", *TINY, "--guide-option", "init_scale=1e300", "--out",
     "NEW"], ["option init_scale must be at most 3.4e+38"]),
    ("guide-option-init-radius-negative", None, ["train", *TINY, "--guide-option", "init_radius=-1", "--out",
     "NEW"], ["init_radius must lie in"]),
    ("override-on-a-finished-run", None, ["train", "--out", "RUN", "--resume", "--lr", "0.001", "--override",
     "lr"], ["has finished its 2 epochs", "--epochs N (more than 2)"]),
]  # fmt: skip


@pytest.mark.parametrize("spoil, argv, words", [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS])
def test_bad_input_is_one_line_and_exit_2(capsys, run, tmp_path, spoil, argv, words):
    if spoil:
        spoil(run)
    capsys.readouterr()
    before = sorted(p.name for p in run.iterdir())
    names = {"RUN": str(run), "GRID": str(tmp_path / "grid"), "NEW": str(tmp_path / "new")}
    line = assert_one_line_error(*cli(capsys, *[names.get(a, a) for a in argv]), *words)
    assert "Traceback" not in line
    assert not (tmp_path / "new").exists()  # a refused new run leaves no folder behind
    assert sorted(p.name for p in run.iterdir()) == before  # and a refused command writes nothing


def test_the_counts_in_results_md_are_the_suites():
    """experiments/RESULTS.md gives the number of fault and bad-input cases: they must be these."""
    text = (ROOT / "experiments" / "RESULTS.md").read_text()
    assert f"{len(KILLS) + 1} kill-and-resume cases" in text
    assert f"{len(BAD_INPUTS)} bad inputs" in text
    assert f"{len(FOREIGN) * len(USES)} foreign-guide cases" in text
