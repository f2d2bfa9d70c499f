"""The after-training commands: ``pyrozoo prune --posterior laplace-*`` and ``pyrozoo sweep`` on a tiny MAP run
(``map_run``, a copy of the one trained once per session in conftest.py)."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from clitools import assert_one_line_error, cli

from pyrozoo.bmr import rebuild
from pyrozoo.train import Run


@pytest.mark.parametrize("posterior", ["laplace-diag", "laplace-kfac"])
def test_prune_a_map_run_from_a_laplace_posterior_to_a_sparsity(capsys, map_run, posterior):
    code, out, err = cli(
        capsys, "prune", "map", "--posterior", posterior, "--sparsity", "0.6", "--fit-size", "500"
    )
    assert code == 0, err
    assert "pruned fraction 0.6000" in out
    state = torch.load(map_run / f"pruned-{posterior}.pt", weights_only=False)
    masks = state["masks"]
    assert {"net_state_dict", "laplace", "metrics"} <= set(state)
    hidden = [m for name, m in masks.items() if name != "head"]
    assert abs(sum(int((~m).sum()) for m in hidden) / sum(m.numel() for m in hidden) - 0.6) < 1e-3


def test_sweep_writes_the_curve_and_the_figure(capsys, map_run):
    code, out, err = cli(
        capsys,
        "sweep",
        "map",
        "--sparsities",
        "0.5",
        "0.9",
        "--fit-size",
        "300",
        "--no-progress",
        "--methods",
        "bmr-laplace-kfac",
        "bmr-laplace-kfac-nowb",
        "bmr-laplace-kfac-diagdf",
        "magnitude",
        "torch-pruning",
    )
    assert code == 0, err
    assert "laplace-diag: fitted in" in err  # the diagdf variant's ranking, fitted once beside KFAC
    table = pd.read_csv(map_run / "sweep" / "sweep.csv")
    bmr = ["bmr-laplace-kfac", "bmr-laplace-kfac-nowb", "bmr-laplace-kfac-diagdf"]
    assert set(table.method) == {"dense", *bmr, "magnitude", "torch-pruning"}
    # write-back moves the survivors: the same masks (same dF ranking) give another net without it
    at = table[table.target == 0.9].set_index("method")
    assert at.nll["bmr-laplace-kfac"] != at.nll["bmr-laplace-kfac-nowb"]
    rows = table[table.method.isin([*bmr, "magnitude"])]
    assert ((rows.sparsity - rows.target).abs() < 1e-3).all()
    channel = table[table.method == "torch-pruning"]
    assert ((channel.sparsity - channel.target).abs() < 0.1).all()
    assert (map_run / "sweep" / "sweep.png").exists() and "1 point below" in out


def test_sweep_refuses_bmr_from_a_point_mass_and_bad_sparsities(capsys, map_run):
    assert_one_line_error(*cli(capsys, "sweep", "map", "--methods", "bmr-run"), "spread")
    assert_one_line_error(*cli(capsys, "sweep", "map", "--sparsities", "1.5"), "1.5")
    stray = "sweep", "map", "--methods", "magnitude", "--posterior-option", "fit_size=10"
    assert_one_line_error(*cli(capsys, *stray), "'fit_size' is taken by no posterior source swept")
    magnitude = "sweep", "map", "--methods", "magnitude", "--samples", "3"
    assert_one_line_error(
        *cli(capsys, *magnitude), "--samples evaluates the reduced posterior of a BMR method"
    )
    glm = "sweep", "map", "--methods", "bmr-laplace-diag", "--posterior-option", "predictive=glm"
    assert_one_line_error(*cli(capsys, *glm), "add --samples N")
    fit = "prune", "map", "--posterior", "laplace-diag", "--posterior-option", "fit_size=0"
    assert_one_line_error(*cli(capsys, *fit), "fit_size is a positive number")


def test_sweep_adds_the_reduced_laplace_posteriors_glm_predictive_to_the_one_shot_rows(capsys, map_run):
    """``--samples N``: each BMR-from-Laplace cell gets a row more, its reduced posterior's GLM predictive; the
    fine-tuned net has no posterior (point estimate only), nor has magnitude pruning."""
    code, out, err = cli(
        capsys, "sweep", "map", "--methods", "bmr-laplace-kfac", "magnitude", "--sparsities", "0.5",
        "--fit-size", "300", "--samples", "4", "--finetune-steps", "2", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    table = pd.read_csv(map_run / "sweep" / "sweep.csv")

    def rows(method):  # (fine-tune steps, predictive, draws) of each of the method's rows
        picked = table[table.method == method]
        return list(zip(picked.finetune_steps, picked.predictive, picked.samples))

    assert rows("bmr-laplace-kfac") == [(0, "point", 1), (0, "glm", 4), (2, "point", 1)]
    assert rows("magnitude") == [(0, "point", 1), (2, "point", 1)] and rows("dense") == [(0, "point", 1)]
    kfac = table[table.method == "bmr-laplace-kfac"]
    assert kfac.sparsity.nunique() == 1 and kfac[kfac.predictive == "glm"].accuracy.between(0, 1).all()
    assert "reduced posterior's predictive (4 draws)" in out
    assert (map_run / "sweep" / "sweep.png").exists()


@pytest.mark.parametrize("predictive", ["glm", "samples"])
def test_the_sweeps_predictive_rows_are_pyrozoo_predict_of_the_reduced_posterior(trained_map_run, predictive):
    """The sweep's predictive row is ``pyrozoo.predict`` of the Laplace posterior fitted and reduced by the same
    pass outside the sweep (same draws: the run's seed), whose draws are 0 at every pruned entry."""
    from pyrozoo.bmr import TargetSparsity
    from pyrozoo.metrics import accuracy, ece_equal_mass
    from pyrozoo.posteriors import make_source
    from pyrozoo.predict import _draws, predict
    from pyrozoo.sweep import sweep

    options = {"predictive": predictive}
    with Run.open(trained_map_run, log=lambda text: None) as run:
        table = sweep(run, [0.7], ["bmr-laplace-kfac"], progress=False, log=lambda text: None, fit_size=300,
                      posterior_options=options, samples=6)  # fmt: skip
        row = table[table.predictive == predictive].iloc[0]
        model, posterior = make_source("laplace-kfac", options, fit_size=300).fit(run, progress=False)
        TargetSparsity(0.7)(model, posterior)
        x, y = run.data.x_test, run.data.y_test
        out = predict(model, posterior, x, 6, seed=run.config.seed, y=y)
    assert row.samples == 6 and row.sparsity == pytest.approx(0.7, abs=1e-3)
    assert row.accuracy == pytest.approx(accuracy(out["probs"], y), abs=1e-12)
    assert row.nll == pytest.approx(float(out["nll"].mean()), rel=1e-9)
    assert row.ece == pytest.approx(ece_equal_mass(out["probs"], y), abs=1e-12)
    point = table[table.predictive == "point"].iloc[1]  # the same reduced posterior's mean, one draw
    assert row.nll != point.nll
    for weights, _ in _draws(model, posterior, 3, seed=run.config.seed):
        for layer in model.layers:
            assert bool((weights[layer.name][model.mask(layer.name) == 0] == 0).all())


def test_sweep_draws_a_runs_own_reduced_posterior(capsys, ff_run):
    """A mean-field run's own posterior, reduced by BMR, predicts by the net at its sampled weights."""
    sweep = "sweep", "run", "--methods", "bmr-run", "--sparsities", "0.5", "--samples", "3", "--no-progress"
    code, out, err = cli(capsys, *sweep)
    assert code == 0, err
    table = pd.read_csv(ff_run / "sweep" / "sweep.csv").set_index("predictive")
    assert table.loc["samples", "samples"] == 3 and table.loc["samples", "method"] == "bmr-run"
    assert 0 <= table.loc["samples", "accuracy"] <= 1


def test_export_a_laplace_pruned_result(capsys, map_run):
    """``pyrozoo export`` exports what ``prune --posterior laplace-*`` wrote: by name, or the newest of several."""
    assert_one_line_error(*cli(capsys, "export", "map", "--pruned", "laplace-kfac"), "prune", "laplace-kfac")
    for posterior in ("laplace-kfac", "laplace-diag"):
        code, _, err = cli(
            capsys, "prune", "map", "--posterior", posterior, "--sparsity", "0.98", "--fit-size", "300"
        )
        assert code == 0, err
        if posterior == "laplace-kfac":
            code, out, err = cli(capsys, "export", "map", "--repeats", "1")  # the only pruned result
            assert code == 0, err
            assert "pruned-laplace-kfac.pt" in out and "several" not in err
    code, out, err = cli(capsys, "export", "map", "--repeats", "1")
    assert code == 0, err
    assert "2 pruned results" in err and "using the newest, pruned-laplace-diag.pt" in err
    for posterior in ("laplace-kfac", "laplace-diag"):
        code, out, err = cli(capsys, "export", "map", "--pruned", posterior, "--repeats", "1")
        assert code == 0, err
        state = torch.load(map_run / f"pruned-{posterior}.pt", weights_only=False)
        summary = pd.read_json(map_run / "export" / "summary.json", typ="series")
        assert summary["source"]["state"] == f"pruned-{posterior}.pt"
        # the exported nets are the pruned net: its accuracy, its non-zero weights, its function
        assert summary["full_shapes"]["accuracy"] == pytest.approx(state["metrics"]["accuracy"], abs=1e-9)
        assert summary["units_cut"]["accuracy"] == pytest.approx(state["metrics"]["accuracy"], abs=1e-9)
        nonzero = sum(int((v != 0).sum()) for v in state["net_state_dict"].values())
        assert summary["full_shapes"]["nonzero_parameters"] == nonzero
        assert summary["units_cut"]["parameters"] <= summary["full_shapes"]["parameters"]
        run = Run.open(map_run)
        dense = rebuild(run.model, run.guide, remove_dead=False)
        dense.load_state_dict(state["net_state_dict"])
        sparse = torch.load(map_run / "export" / "sparse_net.pt", weights_only=False)
        x = torch.randn(5, 1, 28, 28)
        assert torch.allclose(sparse(x), dense.eval()(x), atol=1e-5)
    assert_one_line_error(*cli(capsys, "export", "map", "--pruned", "run"), "pruned.pt", "prune")
    # a unit whose weights are all pruned is cut out of the exported sparse net
    path = map_run / "pruned-laplace-kfac.pt"
    state = torch.load(path, weights_only=False)
    state["masks"]["body.1"][0] = False
    state["net_state_dict"]["body.1.weight"][0] = 0
    state["net_state_dict"]["body.1.bias"][0] = 0
    torch.save(state, path)
    code, out, err = cli(capsys, "export", "map", "--pruned", "laplace-kfac", "--repeats", "1")
    assert code == 0, err
    summary = pd.read_json(map_run / "export" / "summary.json", typ="series")
    assert summary["units_cut"]["parameters"] < summary["full_shapes"]["parameters"]


def test_pruned_means_the_same_on_export_predict_and_uncertainty(capsys, map_run):
    """``--pruned`` alone is the newest pruned result on all three, and with none there each says how to make
    one (export without --pruned falls back to the trained checkpoint, its documented default); an unknown value
    is refused alike."""
    for command in (["predict", "map", "--out", "p.csv"], ["uncertainty", "map"]):
        assert_one_line_error(
            *cli(capsys, *command, "--pruned", "--no-progress"), "no pruned result", "prune"
        )
        code, _, err = cli(capsys, *command, "--pruned", "lastest", "--no-progress")
        assert code == 2 and "invalid choice" in err
    assert_one_line_error(*cli(capsys, "export", "map", "--pruned", "--repeats", "1"), "no pruned result")
    code, out, _ = cli(
        capsys, "export", "map", "--repeats", "1"
    )  # its default: the newest, else the checkpoint
    assert code == 0 and "(checkpoint," in out
    assert (
        cli(capsys, "prune", "map", "--posterior", "laplace-diag", "--rule", "sparsity", "--no-progress")[0]
        == 0
    )
    code, out, _ = cli(capsys, "predict", "map", "--pruned", "--out", "p.csv", "--no-progress")
    assert code == 0
    code, out, _ = cli(capsys, "export", "map", "--pruned", "--repeats", "1")
    assert code == 0 and "pruned-laplace-diag.pt" in out
