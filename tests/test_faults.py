"""Issue 33, items 6 and 7: evaluation memory that does not grow with --samples, and the faults a careless or
hostile user meets: a full disk, a read-only folder, data that cannot train, a wrong --data-dir, duplicated
columns, corrupt run files for every subcommand that reads them, refused commands that change no file (figures
included), and kill -9 at file events (slow), after which the same command ends as the uninterrupted twin.

The cheap cases share one finished tiny run (conftest's trained_pruned_run) and one one-cell grid; the full-disk
cases mount a tmpfs (root only) and the read-only ones use ``chattr +i`` (root ignores mode bits), each skipped
where it cannot.
"""

from __future__ import annotations

import dataclasses
import json
import os
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
from test_distributed import RUN as DISTRIBUTED_RUN
from test_distributed import assert_close_runs, two_processes  # noqa: F401 (a fixture)
from test_reliability import isolated, same  # noqa: F401 (isolated: an autouse fixture)

from pyrozoo import compare, data, metrics
from pyrozoo.cli import main
from pyrozoo.runfolder import CHECKPOINT

ROOT = Path(__file__).resolve().parents[1]


# --- item 6: evaluation memory --------------------------------------------------------------------------------

UNDER_A_LIMIT = """
import resource, torch
torch.set_num_threads(1)
from pyrozoo.metrics import evaluate_draws
S, N, C = {samples}, 20_000, 2
x = torch.arange(N)
y = x % 2
lp = torch.log_softmax(torch.stack([x * 0.0, x * 1e-4], 1).double(), -1)
size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (64 << 20), resource.RLIM_INFINITY))
got = evaluate_draws([lambda idx: lp[idx]] * S, x, y, C, S, batch_size=N)
want = -lp[x, y].mean().item()  # every draw the same: NLL is the cross-entropy, LPD its negative
assert abs(got["nll"] - want) < 1e-9 and abs(got["lpd"] + want) < 1e-9, (got, want)
print("ok")
"""


def test_evaluation_memory_does_not_grow_with_samples():
    """1000 draws over 20,000 points under 64 MB more address space than the process had: keeping a
    (sample, point) matrix would need 180 MB, the accumulator keeps per-point sums only."""
    script = UNDER_A_LIMIT.format(samples=1000)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_points_per_chunk_bounds_the_draws_held():
    for samples in (1, 100, 10_000, 10**7):
        chunk = metrics.points_per_chunk(samples, 50_000)
        assert chunk >= 1 and (chunk == 1 or chunk * samples <= metrics.POINT_DRAWS_AT_ONCE)
    assert metrics.points_per_chunk(100, 500) == 500  # a small test set is one chunk: the draws are not replayed


def test_regression_evaluation_and_predict_in_chunks_are_the_whole(tmp_path, monkeypatch):
    """Chunks of 70 points, each replaying the draws: the metrics and predictions of one chunk of all points."""
    from test_regression import quiet, tiny_regression

    from pyrozoo.predict import predict
    from pyrozoo.train import Run

    run = Run(tiny_regression("flat-ff", epochs=1), tmp_path, log=quiet)
    run.train(progress=False)
    whole = run.evaluate()
    x = run.data.x_test
    kwargs = dict(samples=run.config.samples, seed=3, y=run.data.y_test)
    predicted = predict(run.model, run.guide, x, **kwargs)
    monkeypatch.setattr(metrics, "POINT_DRAWS_AT_ONCE", 70 * run.config.samples)
    assert len(x) > 70 * 3
    chunked = run.evaluate()
    # the same draws: only the net's float32 rounding on another batch shape differs
    assert chunked == pytest.approx(whole, rel=1e-6, abs=1e-9)
    again = predict(run.model, run.guide, x, **kwargs)
    assert predicted.keys() == again.keys()
    for key in predicted:
        torch.testing.assert_close(again[key], predicted[key], rtol=1e-5, atol=1e-7, msg=key)


# --- item 7: the faults, on one finished tiny run shared by the module ---------------------------------------

TINY = ["--data", "fashion-mnist-mini", "--net", "mlp", "--net-option", "hidden=(4,)", "--epochs", "1",
        "--steps-per-epoch", "5", "--batch-size", "32", "--samples", "2", "--no-progress"]  # fmt: skip


@pytest.fixture
def finished(trained_pruned_run) -> Path:
    """A finished one-epoch tiny run, pruned, made once per session (conftest's); tests copy it."""
    return trained_pruned_run


@pytest.fixture
def run(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (the lock file aside), by relative path, with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


# Every subcommand that writes, on the run ("RUN") or into a folder beside it ("OUT"), cheaply.
WRITERS = {
    "resume": ["train", "--out", "RUN", "--resume", "--epochs", "2"],
    "prune": ["prune", "RUN"],
    "export": ["export", "RUN", "--repeats", "1"],
    "sweep": ["sweep", "RUN", "--sparsities", "0.5", "--methods", "magnitude", "--no-progress"],
    "uncertainty": ["uncertainty", "RUN", "--samples", "1", "--no-progress"],
    "predict": ["predict", "RUN", "--samples", "1", "--no-progress", "--out", "OUT/p.csv"],
    "compare": ["compare", "--out", "OUT/grid", "--data", "fashion-mnist-mini", "--nets", "mlp", "--methods",
                "flat-ff", "--epochs", "1", "--no-progress"],
}  # fmt: skip


def _argv(argv: list[str], run: Path, out: Path) -> list[str]:
    return [a.replace("RUN", str(run)).replace("OUT", str(out)) for a in argv]


def _immutable(*folders: Path):
    """``chattr +i`` on folders (root ignores mode bits; an immutable folder refuses root too); skips the test
    where it cannot be done."""
    for folder in folders:
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i is not available here: {done.stderr.decode().strip()}")


def _mutable(*folders: Path):
    for folder in folders:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


@pytest.mark.parametrize("command", list(WRITERS))
def test_a_read_only_folder_is_one_line_for_every_writing_subcommand(capsys, run, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(tmp_path)
    _immutable(run, out)
    try:
        code, stdout, err = cli(capsys, *_argv(WRITERS[command], run, out))
    finally:
        _mutable(run, out)
    assert_refused(code, err, "cannot")
    assert snapshot(tmp_path) == before


def assert_refused(code: int, err: str, *words: str) -> None:
    """Exit 2 and the one-line error last on stderr (a run's progress lines may come before it)."""
    lines = err.splitlines()
    assert code == 2 and lines and lines[-1].startswith("pyrozoo: error:"), err
    assert "Traceback" not in err and sum(line.startswith("pyrozoo: error:") for line in lines) == 1, err
    for word in words:
        assert word in lines[-1], lines[-1]


# --- a full disk ---------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs mounted at tmp_path/disk (root only; skipped elsewhere), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` up, then free ``leave`` bytes; returns the filler file."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    with open(filler, "r+b") as f:  # the last partial block may sit in Python's buffer: trust the file's size
        f.truncate(max(0, filler.stat().st_size - leave))
    return filler


# (subcommand, bytes left free): one page, which the lock file's holder record takes, and then nothing fits.
FULL = [(command, 4096) for command in ("resume", "prune", "export")] + [
    pytest.param(command, 4096, marks=pytest.mark.slow) for command in ("sweep", "uncertainty")
] + [
    ("resume", 0),
]  # fmt: skip


@pytest.mark.parametrize("command, leave", FULL)
def test_a_full_disk_is_one_line_and_keeps_the_committed_epoch(capsys, finished, small_disk, command, leave):
    run = small_disk / "run"
    shutil.copytree(finished, run)
    (run / ".lock").unlink(missing_ok=True)  # made afresh, in the page left
    before = snapshot(run)
    filler = _fill(small_disk, leave)
    code, _, err = cli(capsys, *_argv(WRITERS[command], run, small_disk))
    assert_refused(code, err, "No space left on device")
    assert snapshot(run) == before
    assert compare.finished_epochs(run) == 1
    assert (run / CHECKPOINT).read_bytes() == before[CHECKPOINT]
    assert not [p.name for p in run.iterdir() if p.name.endswith((".tmp", ".old"))]
    filler.unlink()  # with room again, the same command goes through
    code, _, err = cli(capsys, *_argv(WRITERS[command], run, small_disk))
    assert code == 0, err


def test_a_write_error_of_any_exception_type_is_one_line(capsys, run, monkeypatch):
    """torch.save reports a full disk as a RuntimeError: it is one line, and the committed epoch stays."""
    before = snapshot(run)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full)
    code, _, err = cli(capsys, *_argv(WRITERS["resume"], run, run))
    assert_refused(code, err, "cannot write", "checkpoint.pt", "unexpected pos")
    assert (run / CHECKPOINT).read_bytes() == before[CHECKPOINT] and compare.finished_epochs(run) == 1


# --- data that cannot train, a wrong --data-dir -------------------------------------------------------------

GOOD_TABLE = "a,b,y\n" + "".join(f"{i % 7},{(i * 3) % 5},{i % 4 + 0.5 * (i % 3)}\n" for i in range(30))
TABLE_ARGS = ["--net", "mlp", "--net-option", "hidden=(4,)", "--target", "y", "--epochs", "1",
              "--steps-per-epoch", "2", "--batch-size", "8", "--samples", "2", "--no-progress"]  # fmt: skip


def _spoil(row: int, column: int, value: str, header: str = "a,b,y") -> str:
    rows = GOOD_TABLE.splitlines()[1:]
    cells = rows[row].split(",")
    cells[column] = value
    rows[row] = ",".join(cells)
    return "\n".join([header, *rows]) + "\n"


# (id, the table, words the one line must hold)
BAD_TABLES = [
    ("inf-feature", _spoil(3, 0, "inf"), ["column 'a'", "infinite"]),
    ("minus-inf-target", _spoil(5, 2, "-inf"), ["column 'y'", "infinite"]),
    ("1e300-feature", _spoil(3, 1, "1e300"), ["column 'b'", "too large"]),
    ("1e300-target", _spoil(7, 2, "1e300"), ["column 'y'", "too large"]),
    ("constant-target", "a,b,y\n" + "".join(f"{i},{i % 3},2.5\n" for i in range(30)), ["target is 2.5", "constant"]),
    ("duplicated-header", _spoil(0, 0, "1", header="a,a,y"), ["column 'a' more than once"]),
    ("duplicated-target-header", _spoil(0, 0, "1", header="y,b,y"), ["column 'y' more than once"]),
]  # fmt: skip


@pytest.mark.parametrize("table, words", [pytest.param(*case[1:], id=case[0]) for case in BAD_TABLES])
def test_a_table_that_cannot_train_is_refused_before_training(capsys, tmp_path, table, words):
    (tmp_path / "t.csv").write_text(table)
    argv = ["train", "--data", str(tmp_path / "t.csv"), *TABLE_ARGS, "--out", str(tmp_path / "new")]
    assert_one_line_error(*cli(capsys, *argv), *words)
    assert not (tmp_path / "new").exists()


def test_predict_refuses_input_tables_with_infinite_values_or_duplicated_columns(capsys, tmp_path):
    (tmp_path / "t.csv").write_text(GOOD_TABLE)
    assert main(["train", "--data", str(tmp_path / "t.csv"), *TABLE_ARGS, "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    for table, words in [(_spoil(1, 0, "inf"), ["column 'a'", "infinite"]),
                         (_spoil(1, 1, "-1e300"), ["column 'b'", "too large"]),
                         (_spoil(1, 0, "2", header="a,a,y"), ["more than once"])]:  # fmt: skip
        (tmp_path / "in.csv").write_text(table)
        argv = ["predict", str(tmp_path / "r"), "--input", str(tmp_path / "in.csv"), "--out", str(tmp_path / "p.csv")]
        assert_one_line_error(*cli(capsys, *argv), *words)
        assert not (tmp_path / "p.csv").exists()


def test_a_data_dir_without_the_data_set_is_an_error_not_another_copy(capsys, tmp_path, monkeypatch):
    """The data set lies in $PYROZOO_DATA, but --data-dir names an empty folder: refused, naming both."""
    from test_data import write_mnist_like

    write_mnist_like(tmp_path / "elsewhere")
    monkeypatch.setenv("PYROZOO_DATA", str(tmp_path / "elsewhere"))
    (tmp_path / "empty").mkdir()
    argv = ["train", "--data", "fashion-mnist", "--data-dir", str(tmp_path / "empty"), *TINY[2:],
            "--out", str(tmp_path / "new")]  # fmt: skip
    assert_one_line_error(*cli(capsys, *argv), f"--data-dir {tmp_path / 'empty'} does not hold", "elsewhere")
    assert not (tmp_path / "new").exists()
    assert data.load("fashion-mnist").source == str(tmp_path / "elsewhere")  # without --data-dir: found


def test_values_that_overflow_once_standardised_are_refused():
    """Training features 0 and 1e-20 have a tiny spread; a test value of 1e20 is then 2e40 standard deviations
    out, beyond float32: refused, not trained and evaluated to inf."""
    x_train = torch.tensor([0.0, 1e-20] * 10).reshape(20, 1, 1, 1)
    x_test = torch.tensor([1e20, 0.0]).reshape(2, 1, 1, 1)
    raw = data.RawData("t", x_train, torch.arange(20.0), x_test, torch.zeros(2), 1, "memory", "regress")
    with pytest.raises(data.PyrozooError, match="test values are not finite once standardised"):
        data.prepare(raw)
    data.prepare(dataclasses.replace(raw, x_test=x_train[:2]))  # the same spread, ordinary values: fine


# --- corrupt run files, for every subcommand that reads them ---------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _another_net(run: Path) -> None:
    """The checkpoint of a net one unit narrower than the run's config."""
    state = torch.load(run / CHECKPOINT, weights_only=False)
    state["guide"] = {k: v[..., :-1] if torch.is_tensor(v) and v.dim() else v for k, v in state["guide"].items()}
    torch.save(state, run / CHECKPOINT)


SPOILERS = {
    "checkpoint-truncated": (lambda r: _truncate(r / CHECKPOINT), "checkpoint.pt is corrupt"),
    "config-truncated": (lambda r: _truncate(r / "config.json"), "config.json is"),
    "checkpoint-of-another-net": (_another_net, "does not fit the run"),
    "pruned-truncated": (lambda r: _truncate(r / "pruned.pt"), "pruned.pt is corrupt"),
}
READERS = {
    **{name: WRITERS[name] for name in ("resume", "prune", "export", "sweep", "uncertainty", "predict")},
    "uncertainty-pruned": [*WRITERS["uncertainty"], "--pruned"],
    "predict-pruned": [*WRITERS["predict"], "--pruned"],
}
# metrics.csv is read only from folders written before checkpoints held the metrics (test_reliability's
# bad-input table covers that), export/summary.json by no subcommand, pruned.pt only by export and --pruned.
CORRUPT = [
    pytest.param(spoiler, reader, id=f"{spoiler}/{reader}")
    for spoiler in SPOILERS
    for reader in READERS
    if spoiler != "pruned-truncated" or reader in ("export", "uncertainty-pruned", "predict-pruned")
]


@pytest.mark.parametrize("spoiler, reader", CORRUPT)
def test_a_corrupt_run_file_is_one_line_for_every_reader(capsys, run, tmp_path, spoiler, reader):
    spoil, words = SPOILERS[spoiler]
    spoil(run)
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(tmp_path)
    code, _, err = cli(capsys, *_argv(READERS[reader], run, out))
    assert_refused(code, err, words)
    assert snapshot(tmp_path) == before


# --- a grid with a corrupt cell: plot and compare refuse before changing a file ---------------------------------

GRID = ["--data", "fashion-mnist-mini", "--nets", "mlp", "--methods", "flat-ff", "--net-option", "hidden=(4,)",
        "--epochs", "1", "--steps-per-epoch", "5", "--batch-size", "32", "--samples", "2", "--no-progress"]  # fmt: skip


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory) -> Path:
    """A one-cell grid, trained and plotted once; tests copy it."""
    out = tmp_path_factory.mktemp("grid") / "grid"
    assert main(["compare", *GRID, "--out", str(out)]) == 0
    assert list(out.glob("*.png"))  # figures to keep unchanged
    return out


@pytest.mark.parametrize("command", ["plot", "compare"])
@pytest.mark.parametrize("spoiler", ["checkpoint-truncated", "config-truncated", "checkpoint-of-another-net"])
def test_a_grid_with_a_corrupt_cell_changes_no_file(capsys, finished_grid, tmp_path, command, spoiler):
    grid = tmp_path / "grid"
    shutil.copytree(finished_grid, grid)
    spoil, words = SPOILERS[spoiler]
    spoil(grid / "mlp-flat-ff-fashion-mnist-mini-s0")
    before = snapshot(grid)
    argv = ["plot", str(grid)] if command == "plot" else ["compare", *GRID, "--out", str(grid)]
    code, _, err = cli(capsys, *argv)
    assert_refused(code, err, words)
    assert snapshot(grid) == before  # figures included


# --- kill -9 at file events, then the same command again: the uninterrupted twin, bit for bit ------------------

KILL_RUN = ["--data", "fashion-mnist-mini", "--net", "mlp", "--net-option", "hidden=(16,)", "--method", "bmr-th",
            "--warmup-steps", "0", "--epochs", "3", "--steps-per-epoch", "3", "--batch-size", "32",
            "--samples", "2", "--no-progress"]  # fmt: skip
KILL_GRID = ["--data", "fashion-mnist-mini", "--nets", "mlp", "--methods", "flat-ff", "bmr-th", "--seeds", "0",
             "--net-option", "hidden=(16,)", "--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "32",
             "--samples", "2", "--warmup-steps", "0", "--no-progress", "--no-plots"]  # fmt: skip
STEPS = {  # the command of each case after `pyrozoo`, on the finished run RUN
    "prune": ["prune", "RUN"],
    "export": ["export", "RUN", "--repeats", "1"],
    "sweep": ["sweep", "RUN", "--sparsities", "0.5", "0.8", "--methods", "magnitude", "bmr-run", "--no-progress"],
}


def _pyrozoo(argv: list[str], cwd: Path, wait: bool = True, launcher: tuple[str, ...] = ()):
    """``python [LAUNCHER] -m pyrozoo ARGV`` on this checkout, one thread (so twins round alike), in its own
    session (a kill of its group reaches the workers too)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("PYROZOO_FAULT", None)
    command = [sys.executable, *launcher, "-m", "pyrozoo", *argv]
    process = subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    if wait:
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err
    return process


def _state(path: Path):
    """What a file or folder holds, bit for bit but for wall-clock timings."""
    if path.is_dir():
        return {p.name: _state(p) for p in sorted(path.iterdir()) if not p.name.startswith(".")}
    if path.suffix in (".pt", ".pt2") and path.name != "sparse_net.pt":
        return torch.load(path, weights_only=False) if path.suffix == ".pt" else path.stat().st_size > 0
    if path.suffix == ".csv":
        table = pd.read_csv(path)
        return table.drop(columns=[c for c in table if "seconds" in c]).to_dict("list")
    if path.name == "summary.json":
        summary = json.loads(path.read_text())
        return {k: {i: w for i, w in v.items() if "latency" not in i} if isinstance(v, dict) else v
                for k, v in summary.items() if "speedup" not in k}  # fmt: skip
    if path.suffix in (".png", ".pdf", ".md") or path.name == "sparse_net.pt":
        return path.stat().st_size > 0  # drawn, timed or pickled anew each time: present is all that is asked
    return path.read_bytes()


def kill_at(argv: list[str], cwd: Path, event, launcher: tuple[str, ...] = ()) -> None:
    """Run ``pyrozoo ARGV`` and kill -9 it and every process below it as soon as ``event()`` is true (polled
    every millisecond); the kill must come before the command ends."""
    process = _pyrozoo(argv, cwd, wait=False, launcher=launcher)
    deadline = time.monotonic() + 300
    while not event() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    if process.poll() is None:
        for pid in [process.pid, *_descendants(process.pid)]:  # torchrun's workers have sessions of their own
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _, err = process.communicate()
    assert process.returncode == -signal.SIGKILL, f"the event came after the command ended: {err}"


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def changes(path: Path, times: int = 1):
    """An event: ``path`` was written (appeared or was replaced) ``times`` times, counted by its inode."""
    seen: list[int] = []

    def event() -> bool:
        try:
            inode = path.stat().st_ino
        except FileNotFoundError:
            return False
        if not seen or seen[-1] != inode:
            seen.append(inode)
        return len(seen) >= times

    return event


def appears(folder: Path, pattern: str):
    """An event: a file or folder matching ``pattern`` (a temporary one included) appears in ``folder``."""
    return lambda: folder.is_dir() and any(folder.glob(pattern))


@pytest.fixture(scope="module")
def twin(tmp_path_factory) -> Path:
    """The uninterrupted twin: train, then each of STEPS on its own copy of the trained run."""
    cwd = tmp_path_factory.mktemp("twin")
    _pyrozoo(["train", *KILL_RUN, "--out", "run"], cwd)
    for name, argv in STEPS.items():
        shutil.copytree(cwd / "run", cwd / name)
        _pyrozoo([a.replace("RUN", name) for a in argv], cwd)
    return cwd


@pytest.mark.slow
@pytest.mark.parametrize("times", [1, 2])
def test_train_killed_when_its_checkpoint_changes_resumes_to_the_twin(tmp_path, twin, times):
    kill_at(["train", *KILL_RUN, "--out", "run"], tmp_path, changes(tmp_path / "run" / CHECKPOINT, times))
    _pyrozoo(["train", "--out", "run", "--resume", "--no-progress"], tmp_path)
    same(_state(tmp_path / "run"), _state(twin / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("step, event", [
    ("prune", lambda run: appears(run, "*pruned.pt*")),
    ("export", lambda run: appears(run, "*export*")),
    ("sweep", lambda run: appears(run / "sweep", "*sweep.csv*")),
])  # fmt: skip
def test_a_step_killed_at_its_file_event_ends_as_the_twin(tmp_path, twin, step, event):
    run = tmp_path / step
    shutil.copytree(twin / "run", run)
    argv = [a.replace("RUN", step) for a in STEPS[step]]
    kill_at(argv, tmp_path, event(run))
    _pyrozoo(argv, tmp_path)
    same(_state(run), _state(twin / step))


@pytest.mark.slow
def test_compare_with_two_jobs_killed_when_a_cell_commits_ends_as_the_twin(tmp_path):
    _pyrozoo(["compare", *KILL_GRID, "--out", "twin", "--jobs", "2"], tmp_path)
    cell = tmp_path / "grid" / "mlp-bmr-th-fashion-mnist-mini-s0" / CHECKPOINT
    kill_at(["compare", *KILL_GRID, "--out", "grid", "--jobs", "2"], tmp_path, changes(cell))
    _pyrozoo(["compare", *KILL_GRID, "--out", "grid", "--jobs", "2"], tmp_path)
    same(_state(tmp_path / "grid"), _state(tmp_path / "twin"))


@pytest.mark.slow  # torchrun: about a minute on a busy 2-core machine
def test_torchrun_killed_when_its_checkpoint_appears_resumes_with_one_process(tmp_path, two_processes):  # noqa: F811
    """Two processes killed as epoch 1 commits (mid-epoch 2 by the time the kill lands), resumed by one: the
    state of the uninterrupted two-process run, up to the order of the sum over processes."""
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    kill_at(["train", *DISTRIBUTED_RUN, "--out", "run"], tmp_path, changes(tmp_path / "run" / CHECKPOINT), torchrun)
    assert compare.finished_epochs(tmp_path / "run") < 3
    _pyrozoo(["train", "--out", "run", "--resume", "--no-progress"], tmp_path)
    assert_close_runs(tmp_path / "run", two_processes)
