"""Grids past one process (pyrozoo.compare's launchers): cells as parallel local processes, and as Slurm jobs
through submitit's local executor.

- ``compare --launcher local --jobs 2`` on a four-cell grid, killed mid-way (the whole process group, SIGKILL),
  then run again: every cell finishes, a cell finished before the kill is not trained again, and a cell whose
  folder another process holds is never started (the lock in its folder), until that process lets it go.
- ``--launcher slurm`` through submitit's local executor runs a two-cell grid and collects ``results.csv``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from clitools import assert_one_line_error, cli

from pyrozoo.compare import RESULTS, Local, Slurm, make_grid, run_grid
from pyrozoo.errors import PyrozooError
from pyrozoo.io import hold_folder
from pyrozoo.runfolder import CHECKPOINT, committed_epoch

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
GRID = [
    "--data", "fashion-mnist-mini", "--nets", "mlp", "--methods", "flat-ff", "bmr-th", "--seeds", "0", "1",
    "--net-option", "hidden=(16,)", "--epochs", str(EPOCHS), "--steps-per-epoch", "4", "--batch-size", "32",
    "--samples", "2", "--warmup-steps", "0", "--no-progress", "--no-plots",
]  # fmt: skip
SETTINGS = dict(
    data=["fashion-mnist-mini"],
    nets=["mlp"],
    methods=["flat-ff", "bmr-th"],
    seeds=[0, 1],
    net_options={"hidden": (16,)},
    epochs=EPOCHS,
    steps_per_epoch=4,
    batch_size=32,
    samples=2,
    warmup_steps=0,
)


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    """Worker processes and jobs import this checkout's pyrozoo."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("PYROZOO_FAULT", raising=False)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _finished(grid) -> list:
    return [cell for cell in grid.cells() if committed_epoch(grid.folder(cell)) == EPOCHS]


@pytest.mark.slow  # subprocesses: 1-2 minutes on a busy 2-core machine
def test_a_parallel_grid_killed_and_run_again_finishes_each_cell_once(tmp_path):
    grid = make_grid(out=tmp_path / "grid", **SETTINGS)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "-m", "pyrozoo", "compare", *GRID, "--out", str(grid.out), "--jobs", "2"]
    first = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 300
    while not _finished(grid) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the grid and its workers, as a lost node would
    first.communicate()
    done = _finished(grid)
    assert 1 <= len(done) < 4, "the kill came too late to test anything"
    before = {cell: _digest(grid.folder(cell) / CHECKPOINT) for cell in done}
    held = next(cell for cell in grid.cells() if cell not in done)

    # Another process holds one unfinished cell (here: this one): the grid runs the others, never that one.
    with hold_folder(grid.folder(held)):
        with pytest.raises(PyrozooError, match=f"1 grid cell.*{held.name}.*in use"):
            run_grid(grid, progress=False, launcher=Local(jobs=2))
        assert set(_finished(grid)) == set(grid.cells()) - {held}
        assert committed_epoch(grid.folder(held)) < EPOCHS

    results = run_grid(grid, progress=False, launcher=Local(jobs=2))
    assert set(_finished(grid)) == set(grid.cells())
    for cell, digest in before.items():  # finished before the kill: not trained again
        assert _digest(grid.folder(cell) / CHECKPOINT) == digest, cell.name
    assert len(results) == 4 * EPOCHS
    assert results.groupby(["method", "seed"])["epoch"].apply(list).map(lambda e: e == [1, 2]).all()
    assert pd.read_csv(grid.out / RESULTS).equals(results)


def test_launcher_flags_belong_to_their_launcher(capsys, tmp_path):
    out = str(tmp_path / "grid")
    for flags, words in (
        (["--slurm-option", "partition=gpu"], ["--slurm-option", "--launcher slurm"]),
        (["--launcher", "slurm", "--jobs", "2"], ["--jobs", "--launcher local"]),
        (["--jobs", "0"], ["--jobs", "positive"]),
        (
            ["--launcher", "slurm", "--slurm-option", "cluster=local", "--slurm-option", "colour=red"],
            ["colour"],
        ),
    ):
        assert_one_line_error(*cli(capsys, "compare", *GRID, "--out", out, *flags), *words)


def test_the_slurm_launcher_runs_a_grid_through_submitit_and_collects_the_results(tmp_path):
    pytest.importorskip("submitit")
    settings = {**SETTINGS, "methods": ["flat-ff"]}
    grid = make_grid(out=tmp_path / "grid", **settings)
    options = {"cluster": "local", "timeout_min": 10, "partition": "ignored-by-the-local-executor"}
    results = run_grid(grid, progress=False, launcher=Slurm(options=options))
    assert set(_finished(grid)) == set(grid.cells()) and len(grid.cells()) == 2
    assert len(results) == 2 * EPOCHS and set(results["seed"]) == {0, 1}
    assert pd.read_csv(grid.out / RESULTS).equals(results)
    # submitted, not run here: each job left its own log folder
    assert len([p for p in (grid.out / ".slurm").iterdir() if p.name != "%j"]) == 2
    # run again: nothing left to submit; the results are collected again
    again = run_grid(grid, progress=False, launcher=Slurm(options=options))
    assert again.equals(results)
