"""toy1d's in-between uncertainty: the epistemic std in the gap (-1, 1) against over the data ([-4, -1] and
[1, 4]), and the test RMSE, of finished toy1d runs (their own posterior, or one fitted after training) and of a
scikit-learn Gaussian process (RBF + white noise, hyperparameters by its marginal likelihood) on the same data.

python scripts/gap_uncertainty.py RUN [RUN ...] [--posterior laplace-kfac ...] [--samples 200] [--gp]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pyrozoo import data as datasets
from pyrozoo.posteriors import OWN, make_source
from pyrozoo.predict import predict
from pyrozoo.trained import load

GAP, DATA = (-1.0, 1.0), ((-4.0, -1.0), (1.0, 4.0))
GRID = np.linspace(-4.0, 4.0, 801)
IN_GAP = (GRID > GAP[0]) & (GRID < GAP[1])
ON_DATA = np.zeros_like(GRID, dtype=bool)
for lo, hi in DATA:
    ON_DATA |= (GRID >= lo) & (GRID <= hi)


def _row(name: str, rmse: float, epistemic: np.ndarray, noise_std: float) -> dict:
    gap, data = float(epistemic[IN_GAP].mean()), float(epistemic[ON_DATA].mean())
    return {
        "model": name,
        "rmse": rmse,
        "epistemic_gap": gap,
        "epistemic_data": data,
        "ratio": gap / data if data > 0 else float("nan"),  # a point estimate has no epistemic part
        "noise_std": noise_std,
    }


def run_row(folder: str, posterior: str, samples: int) -> dict:
    with load(folder, log=lambda _: None, write=False) as run:
        name = f"{run.config.method} ({posterior})"
        if posterior != OWN:
            run = run.with_posterior(*make_source(posterior).fit(run, progress=False))
        d = run.data
        mean, std = float(d.mean[0]), float(d.std[0])
        options = dict(y_mean=d.y_mean, y_std=d.y_std, seed=run.config.seed)
        grid = torch.tensor((GRID - mean) / std, dtype=torch.float32).reshape(-1, 1, 1, 1)
        on_grid = predict(run.model, run.guide, grid, samples, **options)
        test = predict(run.model, run.guide, d.x_test, samples, y=d.y_test, **options)
        return _row(
            name,
            float(test["error"].square().mean().sqrt()),
            on_grid["epistemic_std"].numpy(),
            float(on_grid["aleatoric_std"].mean()),
        )


def gp_row() -> dict:
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

    raw = datasets.toy1d()
    x, y = raw.x_train.reshape(-1, 1).numpy(), raw.y_train.numpy()
    kernel = ConstantKernel() * RBF() + WhiteKernel()
    gp = GaussianProcessRegressor(kernel, normalize_y=True, random_state=0).fit(x, y)
    mean = gp.predict(raw.x_test.reshape(-1, 1).numpy())
    _, std = gp.predict(GRID[:, None], return_std=True)  # sklearn's includes the white kernel's noise
    noise = float(np.sqrt(gp.kernel_.k2.noise_level) * gp._y_train_std)
    latent = np.sqrt(
        np.clip(std**2 - noise**2, 0, None)
    )  # the latent function's std alone: the epistemic part
    return _row(
        f"GP ({gp.kernel_})", float(np.sqrt(np.mean((mean - raw.y_test.numpy()) ** 2))), latent, noise
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--posterior", nargs="+", default=[OWN])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--gp", action="store_true", help="also the Gaussian process")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [run_row(folder, p, args.samples) for folder in args.runs for p in args.posterior]
    if args.gp:
        rows.append(gp_row())
    import pandas as pd

    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
