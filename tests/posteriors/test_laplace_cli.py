"""predict and uncertainty with a Laplace posterior fitted around a run's checkpoint (--posterior)."""

from __future__ import annotations

import pandas as pd
import pytest
from clitools import assert_one_line_error, cli


def test_predict_with_a_laplace_posterior_uses_its_linearised_net(capsys, trained_map_run, tmp_path):
    """A MAP run predicts from one draw; --posterior laplace-kfac from the linearised net at --samples draws,
    with an epistemic part (MI), for the same inputs."""
    run, out = str(trained_map_run), tmp_path / "p.csv"
    code, _, err = cli(capsys, "predict", run, "--out", str(out), "--no-progress")
    assert code == 0, err
    map_frame = pd.read_csv(out)
    code, printed, err = cli(
        capsys, "predict", run, "--posterior", "laplace-kfac", "--samples", "8", "--fit-size", "300",
        "--out", str(out), "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    assert "of laplace-kfac-glm (8 posterior samples)" in err and "mean_mi" in printed
    frame = pd.read_csv(out)
    assert (frame["mutual_information"] > 0).any() and "mutual_information" not in map_frame
    assert (frame["target"] == map_frame["target"]).all()


@pytest.mark.parametrize(
    "argv,words",
    [
        (
            ["--posterior", "laplace-kfac", "--pruned", "laplace-kfac"],
            ["--posterior laplace-kfac", "--pruned"],
        ),
        (["--posterior", "laplace-diag", "--posterior-option", "predictive=linear"], ["glm", "samples"]),
        (["--posterior-option", "predictive=glm"], ["'run' takes no option 'predictive'"]),
        (["--posterior", "laplace-diag", "--posterior-option", "noise=learned"], ["evidence", "run"]),
    ],
)
def test_a_bad_posterior_for_predictions_is_one_line(capsys, trained_map_run, tmp_path, argv, words):
    code, out, err = cli(
        capsys, "predict", str(trained_map_run), *argv, "--out", str(tmp_path / "p.csv"), "--no-progress"
    )
    assert_one_line_error(code, out, err, *words)
    assert not (tmp_path / "p.csv").exists()


def test_uncertainty_of_a_laplace_posterior_has_a_file_of_its_own(capsys, map_run):
    code, printed, err = cli(
        capsys, "uncertainty", str(map_run), "--posterior", "laplace-diag", "--posterior-option",
        "predictive=samples", "--samples", "3", "--fit-size", "200", "--no-progress",
    )  # fmt: skip
    assert code == 0, err
    table = pd.read_csv(map_run / "uncertainty-laplace-diag-samples.csv")
    assert set(table["state"]) == {"laplace-diag-samples"} and set(table["samples"]) == {3}
    assert "mi_auroc" in table and not (map_run / "uncertainty.csv").exists()
