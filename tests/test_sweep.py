"""pyrozoo.sweep's summary of a sweep table (the command itself is tested in test_sweep_cli.py)."""

import math

import pandas as pd

from pyrozoo.sweep import below_dense


def _table(metric: str, dense: float, rows: list[tuple[str, int, float, float]]) -> pd.DataFrame:
    records = [{"method": "dense", "target": 0.0, "finetune_steps": 0, metric: dense}]
    records += [{"method": m, "finetune_steps": s, "target": t, metric: v} for m, s, t, v in rows]
    return pd.DataFrame(records)


def test_below_dense_finds_each_methods_last_sparsity_within_a_point_and_first_below():
    table = _table(
        "accuracy",
        0.90,
        [
            ("magnitude", 0, 0.9, 0.50),  # out of order: sorted by target
            ("magnitude", 0, 0.5, 0.895),
            ("magnitude", 0, 0.7, 0.85),
            ("magnitude", 100, 0.5, 0.90),  # fine-tuned: its own row
            ("magnitude", 100, 0.7, 0.891),
            ("bmr-th", 0, 0.5, 0.70),  # below at once
        ],
    )
    got = below_dense(table).set_index(["method", "finetune_steps"])
    assert got.loc[("magnitude", 0)].tolist() == [0.5, 0.7]
    last, first = got.loc[("magnitude", 100)]
    assert last == 0.7 and math.isnan(first)  # never a point below
    last, first = got.loc[("bmr-th", 0)]
    assert math.isnan(last) and first == 0.5


def test_below_dense_of_a_regression_compares_rmse_as_a_fraction_of_the_dense_nets():
    table = _table("rmse", 2.0, [("magnitude", 0, 0.5, 2.019), ("magnitude", 0, 0.7, 2.021)])
    assert below_dense(table).iloc[0][["last_within_1pt", "first_1pt_below"]].tolist() == [0.5, 0.7]
    assert below_dense(table, points=0.02).iloc[0]["last_within_1pt"] == 0.7
