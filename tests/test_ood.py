"""Out-of-distribution detection and its baselines (issue 29): ``pyrozoo uncertainty RUN --ood DATASET``, MC
dropout, deep ensembles, and the AUROC/AUPR they are scored by, against scikit-learn."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest
import torch
from torch import nn

from clitools import assert_one_line_error, cli
from pyrozoo.errors import PyrozooError
from pyrozoo.metrics import auroc, average_precision
from pyrozoo.ood import ensemble, mc_dropout, ood_scores

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("n, levels", [(7, 3), (200, 5), (2000, None)])
def test_average_precision_and_auroc_are_sklearns(n, levels):
    """Ties (few distinct scores) included, where the thresholds matter."""
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(n, generator=g) if levels is None else torch.randint(levels, (n,), generator=g).double()
    positive = torch.rand(n, generator=g) < 0.4
    positive[0], positive[1] = True, False
    assert average_precision(scores, positive) == pytest.approx(
        sklearn_metrics.average_precision_score(positive.numpy(), scores.numpy()), abs=1e-12
    )
    assert auroc(scores, positive) == pytest.approx(
        sklearn_metrics.roc_auc_score(positive.numpy(), scores.numpy()), abs=1e-12
    )
    assert math.isnan(average_precision(scores, torch.zeros(n, dtype=torch.bool)))


def _prediction(probs) -> dict:
    probs = torch.tensor(probs, dtype=torch.float64)
    return {"probs": probs, "entropy": -(probs * probs.log()).nan_to_num().sum(-1)}


def test_an_ensemble_averages_probabilities_and_its_mi_is_the_disagreement():
    a, b = _prediction([[0.9, 0.1], [0.5, 0.5]]), _prediction([[0.1, 0.9], [0.5, 0.5]])
    out = ensemble([a, b])
    assert torch.allclose(out["probs"], torch.full((2, 2), 0.5, dtype=torch.float64))
    h = lambda p: -sum(q * math.log(q) for q in p)  # noqa: E731
    # the first input: members sure of opposite classes, all of the entropy but theirs is disagreement
    assert out["mutual_information"][0].item() == pytest.approx(math.log(2) - h([0.9, 0.1]))
    assert out["mutual_information"][1].item() == pytest.approx(0, abs=1e-12)  # they agree
    assert out["entropy"].tolist() == pytest.approx([math.log(2)] * 2)
    # a member that is itself a mixture brings its own expected entropy
    a["expected_entropy"] = torch.tensor([0.1, 0.2], dtype=torch.float64)
    assert ensemble([a, b])["expected_entropy"][0].item() == pytest.approx((0.1 + h([0.9, 0.1])) / 2)
    with pytest.raises(PyrozooError, match="at least 2"):
        ensemble([a])


def test_ood_scores_separate_by_entropy_and_by_mi_where_there_is_one():
    inside, outside = _prediction([[0.99, 0.01]] * 3), _prediction([[0.5, 0.5]] * 2)
    scores = ood_scores(inside, outside)
    assert scores["ood_entropy_auroc"] == scores["ood_entropy_aupr"] == 1.0 and "ood_mi_auroc" not in scores
    inside["mutual_information"] = torch.tensor([0.3, 0.3, 0.3])
    outside["mutual_information"] = torch.tensor([0.1, 0.1])
    scores = ood_scores(inside, outside)
    assert scores["ood_mi_auroc"] == 0.0 and scores["ood_mi_aupr"] == pytest.approx(0.4)  # 2 of 5, all tied


def test_mc_dropout_is_seeded_leaves_the_callers_stream_and_needs_dropout():
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    x = torch.randn(10, 4)
    torch.manual_seed(1)
    expected_next = torch.rand(1)
    torch.manual_seed(1)
    first = mc_dropout(net, x, passes=20, seed=3, batch_size=4)
    assert torch.equal(torch.rand(1), expected_next)  # the caller's stream as it was
    assert net.training and net[2].training  # modes restored
    again = mc_dropout(net, x, passes=20, seed=3, batch_size=4)
    assert torch.equal(first["probs"], again["probs"])
    assert (first["mutual_information"] > 0).all()  # the passes disagree
    assert torch.allclose(first["entropy"], first["expected_entropy"] + first["mutual_information"])
    plain = torch.softmax(net.eval()(x).double(), -1)
    assert not torch.allclose(first["probs"], plain)  # dropout was on
    assert "mutual_information" not in mc_dropout(net, x, passes=1)
    with pytest.raises(PyrozooError, match="no(ne)? dropout|has none"):
        mc_dropout(nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.0)), x, passes=2)


def test_a_laplace_rows_mc_dropout_row_is_labelled_as_the_runs_own_net(capsys, map_run, tmp_path):
    """MC dropout runs the run's own net, not a fitted posterior's draws: its row keeps the checkpoint's label
    beside the Laplace GLM row, and its numbers are those of the run without --posterior."""
    args = ("--ood", "digits", "--mc-dropout", "2", "--samples", "2", "--no-progress")
    code, _, err = cli(capsys, "uncertainty", "map", *args, "--posterior", "laplace-diag", "--fit-size", "100",
                       "--out", str(tmp_path / "glm"))  # fmt: skip
    assert code == 0, err
    code, _, err = cli(capsys, "uncertainty", "map", *args, "--out", str(tmp_path / "own"))
    assert code == 0, err
    glm = pd.read_csv(next((tmp_path / "glm").glob("*.csv")))
    own = pd.read_csv(tmp_path / "own" / "ood-digits.csv")
    assert glm["row"][0].startswith("flat-map (laplace-diag") and glm["row"][1] == "flat-map mc-dropout"
    assert glm["state"].tolist()[1] == "checkpoint"
    assert glm["ood_entropy_auroc"][1] == pytest.approx(own["ood_entropy_auroc"][1], abs=1e-12)


def test_uncertainty_ood_on_a_digit_set_matches_sklearn_on_the_runs_own_predictions(capsys, map_run):
    """One run: its MAP row and its MC dropout row in RUN/ood-digits.csv, and the MAP row's numbers are those
    scikit-learn gives on pyrozoo.predict's predictions of the test set and the digits (prepared as the run's)."""
    from pyrozoo import data
    from pyrozoo.predict import predict, prepare_like
    from pyrozoo.trained import load

    code, out, err = cli(capsys, "uncertainty", "map", "--ood", "digits", "--mc-dropout", "4", "--no-progress")
    assert code == 0, err
    table = pd.read_csv(map_run / "ood-digits.csv")
    assert table["row"].tolist() == ["flat-map", "flat-map mc-dropout"] and table["samples"].tolist() == [1, 4]
    assert (table["ood_count"] == 898).all() and "ood_entropy_auroc" in out
    assert math.isnan(table["ood_mi_auroc"][0]) and 0 <= table["ood_mi_auroc"][1] <= 1
    assert (map_run / "ood-digits.png").is_file() and (map_run / "ood-digits.pdf").is_file()
    with load(map_run, write=False) as run:
        inside = predict(run.model, run.guide, run.data.x_test, 1)
        digits = data.load("digits")
        outside = predict(run.model, run.guide, prepare_like(run, data.load("fashion-mnist-mini"), digits.x_test).x_test, 1)
        y = run.data.y_test
    labels = [0] * len(inside["entropy"]) + [1] * len(outside["entropy"])
    scores = torch.cat([inside["entropy"], outside["entropy"]]).numpy()
    row = table.iloc[0]
    assert row["ood_entropy_auroc"] == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-9)
    assert row["ood_entropy_aupr"] == pytest.approx(sklearn_metrics.average_precision_score(labels, scores), abs=1e-9)
    assert row["accuracy"] == pytest.approx((inside["class"] == y).double().mean().item())


def test_uncertainty_compares_runs_and_ensembles_in_a_folder_of_its_own(capsys, map_run, trained_ff_run):
    second = shutil.copytree(map_run, map_run.parent / "map2")
    code, out, err = cli(
        capsys, "uncertainty", "map", str(trained_ff_run), "--ood", "digits", "--mc-dropout", "2",
        "--ensemble", "map", "map2", "--out", "table", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    table = pd.read_csv(map_run.parent / "table" / "ood-digits.csv")
    assert table["row"].tolist() == ["flat-map", "flat-map mc-dropout", "flat-ff", "ensemble of 2 flat-map"]
    assert "no dropout" in err  # the flat-ff MLP has none: no MC dropout row for it
    ens, single = table.iloc[3], table.iloc[0]
    # the two members are the same net: their ensemble is that net, and its members never disagree
    assert ens["accuracy"] == single["accuracy"] and ens["ood_entropy_auroc"] == pytest.approx(single["ood_entropy_auroc"])
    assert ens["ood_mi_auroc"] == 0.5 and ens["runs"] == f"map {second.name}"
    assert not (map_run / "ood-digits.csv").exists()  # nothing written into a run's folder


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--ood", "toy1d"], ["toy1d", "(1, 1, 1)", "(1, 28, 28)", "digits"]),
        (["map", "--ood", "digits"], ["--out FOLDER"]),
        (["--mc-dropout", "3"], ["--mc-dropout", "--ood DATASET"]),
        (["--ood", "digits", "--ensemble", "map", "--out", "t"], ["at least two"]),
    ],
)
def test_uncertainty_ood_refuses_with_one_line(capsys, map_run, argv, words):
    code, out, err = cli(capsys, "uncertainty", "map", *argv, "--no-progress")
    assert_one_line_error(code, out, err, *words)
