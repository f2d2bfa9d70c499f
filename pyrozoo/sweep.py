"""The accuracy-sparsity curve: BMR from several posterior sources next to magnitude and channel pruning.

From one trained run (a ``flat-map`` net's MAP weights, or a mean-field run's posterior mean), every method
prunes the same network to each target sparsity, one shot (and optionally fine-tunes the survivors for a few
Adam steps with the masks kept), and is evaluated at its point estimate on the test set (accuracy, NLL, ECE):

- ``bmr-laplace-diag``: BMR's dF from a diagonal Laplace posterior, the largest dF pruned to the target
  (:class:`~pyrozoo.bmr.TargetSparsity`, ranked over all prunable layers);
- ``bmr-laplace-kfac``: the same from a KFAC Laplace posterior, with the reduced posterior mean written back, so
  the survivors compensate; ``bmr-laplace-kfac-nowb`` keeps the survivors as trained (what write-back adds);
  ``bmr-laplace-kfac-diagdf`` ranks by the diagonal Laplace's dF and writes back KFAC's reduced mean (the
  diagonal GGN is exact on the diagonal, where KFAC's marginal variances are only approximate: measured to rank
  better, see experiments/RESULTS.md);
- ``bmr-run``: BMR from the run's own posterior, when it has one with spread (a mean-field run);
- ``magnitude`` / ``magnitude-layer``: smallest |w| globally / in each layer (:mod:`pyrozoo.baselines`);
- ``torch-pruning``: Torch-Pruning's ``MagnitudePruner`` with L1 channel importance, the same channel ratio in
  every layer, the ratio found by bisection to remove the target fraction of the prunable parameters.

Sparsity is the pruned fraction of docs/method.md#pruned-fraction over the prunable layers (all weight layers
but the output layer, biases included), for BMR and magnitude alike the true one: the entries of units that
died with their weights (no inputs left, or no consumers) count as pruned
(:func:`~pyrozoo.bmr.pruned_fraction`); BMR prunes to the target in that count, magnitude by its raw count, so
it may land above. Channel pruning's is the fraction of those layers' parameters it removed.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune
from tqdm.auto import tqdm

from pyrozoo.baselines import finetune, magnitude_prune
from pyrozoo.bmr.rebuild import rebuild
from pyrozoo.bmr.scores import delta_f
from pyrozoo.bmr.sparsity import TargetSparsity
from pyrozoo.bmr.units import pruned_fraction
from pyrozoo.errors import PyrozooError
from pyrozoo.io import atomic_write, make_folder
from pyrozoo.pruners import channel_prune_to

METHODS = (
    "bmr-laplace-diag",
    "bmr-laplace-kfac",
    "bmr-laplace-kfac-nowb",
    "bmr-laplace-kfac-diagdf",
    "bmr-run",
    "magnitude",
    "magnitude-layer",
    "torch-pruning",
)
DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
TABLE, FIGURE = "sweep.csv", "sweep"


def _bmr_net(
    model, posterior, sparsity: float, write_back: bool = True, scores: dict | None = None
) -> tuple[nn.Module, float]:
    """The net after pruning ``model`` to ``sparsity`` by dF (on copies), at the reduced posterior mean, and its
    pruned fraction of the prunable entries (the true one: entries of units that died with their weights count).
    """
    model = copy.deepcopy(model)
    saved = copy.deepcopy(posterior.state_dict())  # the posterior is restored after (guides do not deep-copy)
    if not write_back:
        posterior.reduce = lambda site, pruned: posterior.reset_to_prior(site, pruned)
    try:
        TargetSparsity(sparsity)(model, posterior, scores=scores)
        net = rebuild(model, posterior, remove_dead=False)
    finally:
        if not write_back:
            del posterior.reduce
        posterior.load_state_dict(saved)
    return _masked(net, model), pruned_fraction(model)


def _masked(net: nn.Module, model) -> nn.Module:
    """``net`` with the model's keep-masks as ``torch.nn.utils.prune`` masks, so fine-tuning keeps them."""
    for layer in model.layers:
        if not layer.prunable:
            continue
        mask = model.mask(layer.name).bool()
        for name, value in layer.split(mask.to(torch.float32)).items():
            path, _, attribute = name.rpartition(".")
            torch_prune.custom_from_mask(
                net.get_submodule(path), attribute, value.reshape_as(net.get_parameter(name))
            )
    return net


def _prunable_params(net: nn.Module, layers) -> int:
    """Parameters of the prunable layers (found by module name, whatever their size now)."""
    total = 0
    for layer in layers:
        if layer.prunable:
            module = net.get_submodule(layer.name)
            total += sum(p.numel() for p in module.parameters(recurse=False))
    return total


def channel_prune(
    net: nn.Module, layers, x_example: torch.Tensor, sparsity: float
) -> tuple[nn.Module, float]:
    """Torch-Pruning L1 channel pruning of ``net`` (a copy) to remove about ``sparsity`` of the prunable layers'
    parameters (:func:`pyrozoo.pruners.channel_prune_to`, the closest of the ratios tried); returns the pruned net
    and the fraction it removed. The output layer's outputs are kept."""
    dense = _prunable_params(net, layers)
    head = net.get_submodule(next(layer.name for layer in layers if layer.is_output))
    kept = lambda candidate: _prunable_params(candidate, layers) / dense  # noqa: E731
    candidate, fraction = channel_prune_to(
        net, x_example, "tp-l1", [head], kept, 1 - sparsity, at_most=False, most=0.999
    )
    return candidate, 1 - fraction


def sweep(
    run,
    sparsities=DEFAULT_SPARSITIES,
    methods=None,
    finetune_steps: int = 0,
    progress: bool = True,
    log=print,
    fit_size: int | None = None,
) -> pd.DataFrame:
    """The tidy table of the curve: one row per method, target sparsity and fine-tuning (0 or ``finetune_steps``):
    achieved sparsity, accuracy, NLL, ECE (20 equal-mass bins), ECE (15 bins), Brier, and seconds to prune."""
    from pyrozoo.guides.laplace import laplace_from_run

    methods = list(methods or [m for m in METHODS if m != "bmr-run" or not run.guide.point_mass])
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise PyrozooError(f"unknown sweep method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    if "bmr-run" in methods and run.guide.point_mass:
        raise PyrozooError(
            f"bmr-run needs a posterior with spread; {run.out} is a point-mass ({run.config.method}) run"
        )
    bad = [s for s in sparsities if not 0 <= s < 1]
    if bad:
        raise PyrozooError(f"a target sparsity lies in [0, 1), got {bad[0]}")
    d = run.data
    layers = run.model.layers
    base = rebuild(run.model, run.guide, remove_dead=False)
    dense = run.net_metrics(base)
    rows = [{"method": "dense", "target": 0.0, "sparsity": 0.0, "finetune_steps": 0, "seconds": 0.0, **dense}]

    posteriors = {}
    for structure in ("diag", "kron"):
        name = "bmr-laplace-" + ("diag" if structure == "diag" else "kfac")
        if any(m.startswith(name) for m in methods) or (
            structure == "diag" and "bmr-laplace-kfac-diagdf" in methods
        ):
            start = time.perf_counter()
            posteriors[structure] = (
                *laplace_from_run(run, structure, progress=progress, fit_size=fit_size),
                time.perf_counter() - start,
            )
            log(
                f"Laplace {structure}: fitted in {posteriors[structure][2]:.1f} s; prior precisions "
                + ", ".join(
                    f"{r['layer']} {r['prior_precision']:.3g}" for r in posteriors[structure][0].laplace
                )
            )

    def one(method: str, target: float) -> tuple[nn.Module, float]:
        if method == "bmr-laplace-diag":
            model, posterior, _ = posteriors["diag"]
            return _bmr_net(model, posterior, target)
        elif method == "bmr-laplace-kfac-diagdf":
            model, posterior, _ = posteriors["kron"]
            return _bmr_net(model, posterior, target, scores=delta_f(*posteriors["diag"][:2]))
        elif method in ("bmr-laplace-kfac", "bmr-laplace-kfac-nowb"):
            model, posterior, _ = posteriors["kron"]
            return _bmr_net(model, posterior, target, write_back=method == "bmr-laplace-kfac")
        elif method == "bmr-run":
            model = copy.deepcopy(run.model)
            return _bmr_net(model, run.guide, target)
        elif method in ("magnitude", "magnitude-layer"):
            net = copy.deepcopy(base)
            masks = magnitude_prune(net, layers, target, "global" if method == "magnitude" else "layer")
            # counted as BMR's: the entries of units that died with their weights count as pruned
            for name, mask in masks.items():
                probe.set_mask(name, mask)
            return net, pruned_fraction(probe)
        return channel_prune(base, layers, d.x_train[:2], target)

    probe = copy.deepcopy(run.model)  # magnitude's masks, to count its pruned fraction as BMR's is counted
    point = run.point_likelihood()  # what a fine-tune fits
    cells = [(m, s) for s in sparsities for m in methods]
    for method, target in tqdm(cells, desc="sweep", unit="cell", disable=not progress):
        start = time.perf_counter()
        net, achieved = one(method, target)
        seconds = time.perf_counter() - start
        rows.append(_row(method, target, achieved, 0, seconds, run.net_metrics(net)))
        if finetune_steps:
            c = run.config
            finetune(net, d.x_train, d.y_train, finetune_steps, c.lr, c.batch_size, c.seed, point)
            rows.append(
                _row(
                    method,
                    target,
                    achieved,
                    finetune_steps,
                    seconds,
                    run.net_metrics(net),
                )
            )
    table = pd.DataFrame(rows)
    table.insert(0, "net", run.config.net)
    table.insert(1, "data", run.config.data)
    return table


def _row(method, target, achieved, steps, seconds, metrics) -> dict:
    return {
        "method": method,
        "target": target,
        "sparsity": achieved,
        "finetune_steps": steps,
        "seconds": seconds,
        **metrics,
    }


def write_sweep(table: pd.DataFrame, folder: str | os.PathLike) -> list[Path]:
    """``folder/sweep.csv`` and the figure ``folder/sweep.{png,pdf}``, each written atomically."""
    from pyrozoo.plots import plot_sweep

    folder = make_folder(folder)
    atomic_write(folder / TABLE, lambda p: table.to_csv(p, index=False))
    return [folder / TABLE, *plot_sweep(table, folder, FIGURE)]


def below_dense(table: pd.DataFrame, points: float = 0.01) -> pd.DataFrame:
    """Per method (and fine-tuning), the smallest target sparsity whose accuracy is ``points`` below the dense
    net's (a regression's: whose RMSE is a fraction ``points`` above it), and the largest one still within it
    (NaN where none)."""
    dense = table.loc[table.method == "dense"].iloc[0]
    out = []
    for (method, steps), rows in table[table.method != "dense"].groupby(["method", "finetune_steps"]):
        rows = rows.sort_values("target")
        if "rmse" in table:
            within = rows.rmse <= dense.rmse * (1 + points)
        else:
            within = rows.accuracy >= dense.accuracy - points
        out.append(
            {
                "method": method,
                "finetune_steps": steps,
                "last_within_1pt": rows.target[within].max() if within.any() else float("nan"),
                "first_1pt_below": rows.target[~within].min() if (~within).any() else float("nan"),
            }
        )
    return pd.DataFrame(out)
