"""Tests for pyrozoo.plots: every figure is written as PNG and PDF, headless, from results.csv and run folders."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pyrozoo.cli import main
from pyrozoo.compare import RESULTS, make_grid, run_grid
from pyrozoo.plots import plot_curves, plot_grid

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def grid_folder(tmp_path_factory):
    """A tiny trained grid: bmr-ss (one BMR pass after epoch 1), tiered-ff and flat-map on the bundled subset."""
    out = tmp_path_factory.mktemp("grid")
    grid = make_grid(
        nets=["mlp"],
        methods=["flat-map", "tiered-ff", "bmr-ss"],
        data=["fashion-mnist-mini"],
        out=out,
        epochs=2,
        steps_per_epoch=3,
        batch_size=32,
        samples=2,
        warmup_steps=0,
    )
    run_grid(grid, progress=False)
    return out


def assert_figures(folder, stems):
    for stem in stems:
        png, pdf = folder / f"{stem}.png", folder / f"{stem}.pdf"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5000, stem
        assert pdf.read_bytes()[:5] == b"%PDF-", stem
    assert not list(folder.glob("*.tmp"))


def synthetic_results() -> pd.DataFrame:
    """Two nets, three methods, two seeds, evaluated every other epoch, and a baseline row per seed."""
    rng = np.random.default_rng(0)
    rows = []
    for net in ("mlp", "lenet"):
        for method in ("flat-ff", "bmr-ss"):
            for seed in (0, 1):
                for epoch in range(1, 7):
                    evaluated = epoch % 2 == 0
                    rows.append(
                        dict(data="toy", net=net, method=method, seed=seed, epoch=epoch,
                             accuracy=rng.uniform(0.5, 0.9) if evaluated else np.nan,
                             nll=rng.uniform(0.3, 1) if evaluated else np.nan,
                             ece=rng.uniform(0, 0.1) if evaluated else np.nan,
                             pruned_fraction=0.0 if method == "flat-ff" else epoch / 10)
                    )  # fmt: skip
        for seed in (0, 1):
            rows.append(dict(data="toy", net=net, method="magnitude", seed=seed, epoch=6, accuracy=0.5, nll=1.0,
                             ece=0.1, pruned_fraction=0.6))  # fmt: skip
    return pd.DataFrame(rows)


def test_curves_from_a_results_table(tmp_path):
    paths = plot_curves(synthetic_results(), tmp_path)
    assert sorted(p.name for p in paths) == sorted(
        f"curves-toy-{net}.{fmt}" for net in ("mlp", "lenet") for fmt in ("png", "pdf")
    )
    assert_figures(tmp_path, ["curves-toy-mlp", "curves-toy-lenet"])


def test_plot_redraws_a_grid_headless(grid_folder):
    stems = [f"{kind}-fashion-mnist-mini-mlp" for kind in ("curves", "weight-cdf", "delta-f")]
    assert not list(grid_folder.glob("*.png"))  # run_grid writes the table; the figures come from plot
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MPLBACKEND"] = "TkAgg"  # a GUI backend asked for, and no display: pyrozoo must still draw to files
    done = subprocess.run(
        [sys.executable, "-m", "pyrozoo.cli", "plot", str(grid_folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "weight-cdf-fashion-mnist-mini-mlp" in done.stdout
    assert_figures(grid_folder, stems)


def test_posterior_figures_need_the_run_folders(grid_folder, tmp_path, capsys):
    # results.csv copied away from its runs: the curves are redrawn, the posterior figures left out, said so
    (tmp_path / RESULTS).write_bytes((grid_folder / RESULTS).read_bytes())
    paths = plot_grid(tmp_path, log=print)
    assert {p.stem for p in paths} == {"curves-fashion-mnist-mini-mlp"}
    assert "no checkpoint.pt" in capsys.readouterr().out


def test_plot_of_a_folder_without_results(capsys, tmp_path):
    assert main(["plot", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip().endswith("run `pyrozoo compare --out " + str(tmp_path) + "` first")
    assert len(err.splitlines()) == 1


def test_epoch_times_figure(tmp_path):
    """Seconds per epoch come from the running total of metrics.csv; the figure is written as PNG and PDF."""
    from pyrozoo.plots import epoch_seconds, plot_epoch_times

    metrics = pd.DataFrame(
        {"epoch": [1, 2, 3], "seconds": [10.0, 18.0, 21.0], "pruned_fraction": [0.1, 0.9, 0.99]}
    )
    assert epoch_seconds(metrics).tolist() == [10.0, 8.0, 3.0]
    paths = plot_epoch_times(
        {"a": metrics, "b": metrics.assign(seconds=[10.0, 20.0, 30.0])}, tmp_path / "f", "s"
    )
    assert [p.name for p in paths] == ["s.png", "s.pdf"] and all(p.stat().st_size > 0 for p in paths)


def test_the_front_draws_one_line_per_method_and_kind_of_target_in_fixed_colours(tmp_path, monkeypatch):
    """Targets of two kinds are two fronts of a method (not one zigzag line through both), and a method keeps its
    colour whatever order the latencies put the methods in."""
    from pyrozoo import plots

    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, folder, stem: drawn.append(fig.axes[0]) or [])

    def table(pyrozoo_latency):
        rows = [("dense", "-", 1.0, 0.91), ("dense+finetune", "-", 1.0, 0.93)]
        rows += [("pyrozoo", "latency=0.5", pyrozoo_latency, 0.92), ("tp-l1", "latency=0.5", 0.5, 0.91),
                 ("pyrozoo", "params=0.3", 0.3, 0.90), ("tp-l1", "params=0.3", 0.35, 0.90)]  # fmt: skip
        return pd.DataFrame(rows, columns=["method", "target", "latency_b256", "accuracy"])

    for latency in (0.6, 0.2):  # pyrozoo right of tp-l1, then left of it
        plots.plot_front(table(latency), tmp_path)
    for ax in drawn:
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert {"pyrozoo (latency targets)", "pyrozoo (params targets)", "tp-l1 (latency targets)"} <= set(lines)
        assert len(lines["pyrozoo (latency targets)"].get_xdata()) == 1
    markers = {line.get_label(): line.get_marker() for line in drawn[0].get_lines()}
    assert markers["pyrozoo (latency targets)"] != markers["pyrozoo (params targets)"]  # told apart as points too
    colour = [{line.get_label(): line.get_color() for line in ax.get_lines()} for ax in drawn]
    assert colour[0]["pyrozoo (latency targets)"] == colour[1]["pyrozoo (latency targets)"]
    assert colour[0]["pyrozoo (latency targets)"] != colour[0]["tp-l1 (latency targets)"]
