"""Non-Bayesian baselines for the regression sets, on the same split and standardisation as ``pyrozoo train``:

- ``ols``: ordinary least squares on the standardised features (with an intercept); its Gaussian predictive has
  the residual variance RSS / (n - p) plus the estimate's own variance at x (sigma^2 x'(X'X)^-1 x).
- ``mlp``: a plain deterministic MLP of the Bayesian runs' shape, trained by Adam on the mean squared error with
  early stopping: 20% of the training set is held out, the net is checked on it every 50 steps, and the best
  one is kept; its Gaussian predictive has the held-out residuals' variance as noise (no epistemic part).

Metrics (RMSE, NLL, interval coverage, in the targets' units) come from ``pyrozoo.metrics.regression_metrics``
with one "draw", the same code the Bayesian runs are scored with.

    python scripts/regression_baselines.py --data diabetes [--hidden 50 50] [--steps 5000] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import copy

import pandas as pd
import torch

from pyrozoo import data as datasets
from pyrozoo.metrics import regression_metrics
from pyrozoo.nets import create_net


def ols(d) -> dict:
    x = torch.cat([d.x_train.flatten(1).double(), torch.ones(len(d.x_train), 1, dtype=torch.float64)], 1)
    xt = torch.cat([d.x_test.flatten(1).double(), torch.ones(len(d.x_test), 1, dtype=torch.float64)], 1)
    y = d.y_train.double()
    gram = x.T @ x
    w = torch.linalg.solve(gram, x.T @ y)
    sigma2 = (y - x @ w).square().sum() / (len(y) - x.shape[1])
    leverage = (xt @ torch.linalg.solve(gram, xt.T)).diagonal()
    return regression_metrics((xt @ w)[None], (sigma2 * (1 + leverage))[None], d.y_test, d.y_mean, d.y_std)


def mlp(d, hidden: tuple[int, ...], steps: int, batch: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    net = create_net("mlp", in_channels=d.x_train.shape[1], image_size=1, num_classes=1, hidden=hidden)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    order = torch.randperm(len(d.x_train))
    held, fit = order[: len(order) // 5], order[len(order) // 5 :]
    best, best_state = float("inf"), None
    for step in range(steps):
        index = fit[torch.randint(0, len(fit), (min(batch, len(fit)),))]
        loss = (net(d.x_train[index])[:, 0] - d.y_train[index]).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 49:
            with torch.no_grad():
                mse = (net(d.x_train[held])[:, 0] - d.y_train[held]).square().mean().item()
            if mse < best:
                best, best_state = mse, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    with torch.no_grad():
        mean = net(d.x_test)[:, 0]
    return regression_metrics(mean[None], torch.full((1, len(mean)), best), d.y_test, d.y_mean, d.y_std)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="diabetes")
    parser.add_argument("--hidden", type=int, nargs="+", default=[50, 50])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch-size", type=int, default=120)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    torch.set_num_threads(1)
    d = datasets.prepare(datasets.load(args.data))
    rows = [{"data": args.data, "method": "ols", "seed": "-", **ols(d)}]
    for seed in args.seeds:
        metrics = mlp(d, tuple(args.hidden), args.steps, args.batch_size, args.lr, seed)
        rows.append({"data": args.data, "method": "mlp", "seed": seed, **metrics})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
