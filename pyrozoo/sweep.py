"""The accuracy-sparsity curve: BMR from several posterior sources next to magnitude and channel pruning.

From one trained run (a ``flat-map`` net's MAP weights, or a mean-field run's posterior mean), every method
prunes the same network to each target sparsity, one shot (and optionally fine-tunes the survivors for a few
Adam steps with the masks kept), and is evaluated at its point estimate on the test set (accuracy, NLL, ECE);
optionally a BMR method's reduced posterior also by its predictive (a Laplace posterior's linearised net, the
GLM), which a fine-tuned net has not:

- ``bmr-SOURCE``: BMR's dF from each registered posterior source (:mod:`pyrozoo.posteriors`: the run's own
  posterior when it has spread, Laplace approximations around the point estimate, ...), the largest dF pruned to
  the target (:class:`~pyrozoo.bmr.TargetSparsity`, ranked over all prunable layers), the reduced posterior
  mean written back where the posterior has one; ``bmr-SOURCE-VARIANT``: the variants a source declares
  (:class:`~pyrozoo.posteriors.Variant`: without write-back, or ranked by another source's dF);
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
from contextlib import contextmanager
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
from pyrozoo.posteriors import POSTERIORS, FittedSource, Variant, make_source
from pyrozoo.predict import predictive_of
from pyrozoo.pruners import channel_prune_to
from pyrozoo.registry import option_names

BASELINES = ("magnitude", "magnitude-layer", "torch-pruning")
DEFAULT_SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)
TABLE, FIGURE = "sweep.csv", "sweep"


@contextmanager
def _reduced(model, posterior, sparsity: float, write_back: bool = True, scores: dict | None = None):
    """A copy of ``model`` pruned to ``sparsity`` by dF, with ``posterior`` reduced in place for the block (its
    reduced mean written back, or not) and restored after (guides do not deep-copy)."""
    model = copy.deepcopy(model)
    saved = copy.deepcopy(posterior.state_dict())
    if not write_back:
        posterior.reduce = lambda site, pruned: posterior.reset_to_prior(site, pruned)
    try:
        TargetSparsity(sparsity)(model, posterior, scores=scores)
        yield model
    finally:
        if not write_back:
            del posterior.reduce
        posterior.load_state_dict(saved)


def _bmr_net(model, posterior) -> tuple[nn.Module, float]:
    """The net of a pruned ``model`` at its reduced ``posterior``'s mean, and its pruned fraction of the prunable
    entries (the true one: entries of units that died with their weights count)."""
    net = rebuild(model, posterior, remove_dead=False)
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


def bmr_methods() -> dict[str, tuple[str, Variant]]:
    """``{method: (posterior source, variant)}``: ``bmr-NAME`` for every registered source, and
    ``bmr-NAME-SUFFIX`` for each variant it declares."""
    out = {}
    for name, source in POSTERIORS.items():
        out[f"bmr-{name}"] = (name, Variant(f"BMR from {name}"))
        out.update({f"bmr-{name}-{suffix}": (name, v) for suffix, v in source.variants.items()})
    return out


def methods() -> list[str]:
    """Every sweep method: BMR from each posterior source (:func:`bmr_methods`), then the baselines."""
    return [*bmr_methods(), *BASELINES]


def _chosen(run, methods_asked, sparsities) -> list[str]:
    """The methods to run (by default every one that applies to ``run``), refused when unknown or unusable."""
    known, bmr = methods(), bmr_methods()
    why = {m: make_source(bmr[m][0]).unavailable(run) for m in bmr}
    chosen = list(methods_asked or [m for m in known if not why.get(m)])
    unknown = [m for m in chosen if m not in known]
    if unknown:
        raise PyrozooError(f"unknown sweep method {unknown[0]!r}; choose from {', '.join(known)}")
    unusable = [m for m in chosen if why.get(m)]
    if unusable:
        raise PyrozooError(f"{unusable[0]} needs {why[unusable[0]]}")
    bad = [s for s in sparsities if not 0 <= s < 1]
    if bad:
        raise PyrozooError(f"a target sparsity lies in [0, 1), got {bad[0]}")
    return chosen


def _sources(methods: list[str]) -> list[str]:
    """The posterior sources that the BMR methods among ``methods`` fit (a variant's ranking source too)."""
    bmr, names = bmr_methods(), []
    for name, variant in (bmr[m] for m in methods if m in bmr):
        names += [name, variant.ranked_by.name] if variant.ranked_by else [name]
    return list(dict.fromkeys(names))


def _check_options(methods: list[str], options: dict) -> None:
    """Refuse a posterior option that no posterior source of ``methods`` takes."""
    sources = _sources(methods)
    takes = {option for name in sources for option in option_names(POSTERIORS[name])}
    stray = [k for k in options if k not in takes]
    if stray:
        used = ", ".join(sources) or "none"
        raise PyrozooError(
            f"posterior option {stray[0]!r} is taken by no posterior source swept (sources: {used})"
        )


class _Posteriors:
    """Each posterior source's ``(model, posterior)`` for ``run``, fitted once when first asked for."""

    def __init__(self, run, progress: bool, log, **options):
        self.run, self.progress, self.log, self.options, self.fitted = run, progress, log, options, {}

    def __call__(self, name: str):
        if name not in self.fitted:
            source = make_source(name, **self.options)
            start = time.perf_counter()
            self.fitted[name] = model, _ = source.fit(self.run, self.progress)
            if isinstance(source, FittedSource):
                about = source.summary(model)
                seconds = time.perf_counter() - start
                self.log(f"{name}: fitted in {seconds:.1f} s" + (f"; {about}" if about else ""))
        return self.fitted[name]


def _pruned(
    method: str, target: float, run, base: nn.Module, probe, posteriors, samples: int = 0
) -> tuple[nn.Module, float, float, dict | None]:
    """One cell: the net pruned by ``method`` to ``target`` (a copy), its pruned fraction, the seconds that took,
    and with ``samples`` a BMR method's reduced posterior's predictive metrics from that many draws (else None).
    """
    start, layers = time.perf_counter(), run.model.layers
    if method in bmr_methods():
        name, variant = bmr_methods()[method]
        model, posterior = posteriors(name)
        scores = delta_f(*posteriors(variant.ranked_by.name)) if variant.ranked_by else None
        with _reduced(model, posterior, target, variant.write_back, scores) as reduced:
            net, achieved = _bmr_net(reduced, posterior)
            seconds = time.perf_counter() - start
            # the pruned entries are 0 in every draw: the reduced model's masks zero them
            predicted = run.predictive_metrics(reduced, posterior, samples) if samples else None
        return net, achieved, seconds, predicted
    if method in ("magnitude", "magnitude-layer"):
        net = copy.deepcopy(base)
        masks = magnitude_prune(net, layers, target, "global" if method == "magnitude" else "layer")
        # counted as BMR's: the entries of units that died with their weights count as pruned
        for name, mask in masks.items():
            probe.set_mask(name, mask)
        achieved = pruned_fraction(probe)
    else:
        net, achieved = channel_prune(base, layers, run.data.x_train[:2], target)
    return net, achieved, time.perf_counter() - start, None


def _check_samples(methods: list[str], samples: int, options: dict) -> None:
    """Refuse draws of a reduced posterior where no BMR method is swept, and a predictive without draws."""
    if samples and not any(m in bmr_methods() for m in methods):
        raise PyrozooError(
            f"--samples evaluates the reduced posterior of a BMR method; none is swept ({', '.join(methods)}): "
            "add one (e.g. --methods bmr-laplace-kfac) or leave out --samples"
        )
    if "predictive" in options and not samples:
        raise PyrozooError(
            "posterior option predictive says how the reduced posterior's draws predict: add --samples N "
            "(the pruned nets are otherwise evaluated at their point estimate)"
        )


def sweep(
    run,
    sparsities=DEFAULT_SPARSITIES,
    methods=None,
    finetune_steps: int = 0,
    progress: bool = True,
    log=print,
    fit_size: int | None = None,
    posterior_options: dict | None = None,
    samples: int = 0,
) -> pd.DataFrame:
    """The tidy table of the curve: one row per method, target sparsity, fine-tuning (0 or ``finetune_steps``)
    and predictive: achieved sparsity, accuracy, NLL, ECE (20 equal-mass bins), ECE (15 bins), Brier, and
    seconds to prune. Every pruned net is evaluated at its point estimate (``predictive`` ``point``, one draw);
    with ``samples``, each BMR method's reduced posterior (after the pass, pruned entries 0) also by its
    predictive from that many draws (a Laplace posterior's ``glm``, the linearised net, unless the option
    ``predictive=samples`` asks for the net at sampled weights; a run's own posterior's ``samples``). A
    fine-tuned net has no posterior: its rows are point estimates only. ``fit_size`` and ``posterior_options``
    go to the posterior sources that take them (a Laplace fit's inputs, its predictive).
    """
    methods = _chosen(run, methods, sparsities)
    _check_options(methods, posterior_options or {})
    _check_samples(methods, samples, posterior_options or {})
    d, c = run.data, run.config
    base = rebuild(run.model, run.guide, remove_dead=False)
    rows = [_row("dense", 0.0, 0.0, 0, 0.0, run.net_metrics(base))]
    posteriors = _Posteriors(run, progress, log, fit_size=fit_size, **(posterior_options or {}))
    for name in _sources(methods):  # every fit first, before any cell is timed
        posteriors(name)
    probe = copy.deepcopy(run.model)  # magnitude's masks, to count its pruned fraction as BMR's is counted
    point = run.point_likelihood()  # what a fine-tune fits
    cells = [(m, s) for s in sparsities for m in methods]
    for method, target in tqdm(cells, desc="sweep", unit="cell", disable=not progress):
        net, achieved, seconds, predicted = _pruned(method, target, run, base, probe, posteriors, samples)
        rows.append(_row(method, target, achieved, 0, seconds, run.net_metrics(net)))
        if predicted is not None:
            how = predictive_of(posteriors(bmr_methods()[method][0])[1])
            rows.append(_row(method, target, achieved, 0, seconds, predicted, how, samples))
        if finetune_steps:
            finetune(net, d.x_train, d.y_train, finetune_steps, c.lr, c.batch_size, c.seed, point)
            rows.append(_row(method, target, achieved, finetune_steps, seconds, run.net_metrics(net)))
    table = pd.DataFrame(rows)
    table.insert(0, "net", c.net)
    table.insert(1, "data", c.data)
    return table


def _row(method, target, achieved, steps, seconds, metrics, predictive="point", samples=1) -> dict:
    return {
        "method": method,
        "target": target,
        "sparsity": achieved,
        "finetune_steps": steps,
        "predictive": predictive,
        "samples": samples,
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
    """Per method, fine-tuning and predictive, the smallest target sparsity whose accuracy is ``points`` below
    the dense net's (a regression's: whose RMSE is a fraction ``points`` above it), and the largest one still
    within it (NaN where none)."""
    dense = table.loc[table.method == "dense"].iloc[0]
    out = []
    keys = [
        k for k in ("method", "finetune_steps", "predictive") if k in table
    ]  # older tables: no predictive
    for group, rows in table[table.method != "dense"].groupby(keys):
        rows = rows.sort_values("target")
        if "rmse" in table:
            within = rows.rmse <= dense.rmse * (1 + points)
        else:
            within = rows.accuracy >= dense.accuracy - points
        out.append(
            {
                **dict(zip(keys, group)),
                "last_within_1pt": rows.target[within].max() if within.any() else float("nan"),
                "first_1pt_below": rows.target[~within].min() if (~within).any() else float("nan"),
            }
        )
    return pd.DataFrame(out)
