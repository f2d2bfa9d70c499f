"""The paper's figures for a grid folder, as PNG and PDF beside its results.csv (headless: the Agg backend).

- ``curves-<data>-<net>``: accuracy, NLL, ECE and pruned fraction against epoch, one line per method (mean over
  seeds); the magnitude-pruning baselines, evaluated once, are markers at their source run's final epoch.
- ``weight-cdf-<data>-<net>``: per layer, the CDF of |posterior-mean weight| for ``bmr-ss`` against
  ``tiered-ff`` (pruned weights are exactly 0 and drawn at the left edge).
- ``delta-f-<data>-<net>``: per prunable layer, the histogram of dF (the evidence gain of removing a weight) over
  the live weights of every mean-field run (both axes logarithmic, x symmetrically).

The last two need the trained posteriors, so they are drawn from the run folders' checkpoints and skipped where
those are missing (e.g. a results.csv copied away from its runs).
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: draw to files, never to a display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, NullFormatter, SymmetricalLogLocator  # noqa: E402

from pyrozoo.baselines import BASELINES  # noqa: E402
from pyrozoo.errors import PyrozooError, reason  # noqa: E402
from pyrozoo.io import atomic_write, make_folder  # noqa: E402
from pyrozoo.methods import METHODS  # noqa: E402
from pyrozoo.runfolder import CHECKPOINT  # noqa: E402
from pyrozoo.trained import load  # noqa: E402

CURVES = [("accuracy", "test accuracy"), ("nll", "test NLL"), ("ece", "ECE (20 equal-mass bins)")]
REGRESSION_CURVES = [("rmse", "test RMSE"), ("nll", "test NLL"), ("coverage90", "90% interval coverage")]
PRUNED = ("pruned_fraction", "pruned fraction")
CDF_METHODS = ("bmr-ss", "tiered-ff")
CDF_FLOOR = 1e-6  # where |w| = 0 is drawn on the log axis
CDF_POINTS = 2000
FORMATS = ("png", "pdf")
MARKERS = {("global", False): "X", ("global", True): "*", ("layer", False): "P", ("layer", True): "D"}


def _save(fig, folder: Path, stem: str) -> list[Path]:
    paths = []
    for fmt in FORMATS:
        path = folder / f"{stem}.{fmt}"
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight"))
        paths.append(path)
    plt.close(fig)
    return paths


def _colours(methods) -> dict[str, str]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}


def _curve(rows: pd.DataFrame, column: str) -> pd.Series:
    return rows.groupby("epoch")[column].mean().dropna() if column in rows else pd.Series(dtype=float)


def plot_curves(results: pd.DataFrame, folder: Path) -> list[Path]:
    """One figure per dataset and net: a panel per metric, a line per method (NLL on a log axis, as the first
    epochs of MAP reach many times the final value). A baseline marker beyond the training curves' range is
    drawn at the panel's edge with its value written beside it, so it does not squash the curves."""
    paths = []
    for (data, net), table in results.groupby(["data", "net"], sort=False):
        methods = list(dict.fromkeys(table["method"]))
        colours = _colours(methods)
        regression = "rmse" in table and bool(table["rmse"].notna().any())
        panels = (REGRESSION_CURVES if regression else CURVES) + [PRUNED]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
        for ax, (column, label) in zip(axes, panels):
            off_scale = {"low": 0, "high": 0}
            trained = [_curve(table[table["method"] == m], column) for m in methods if m not in BASELINES]
            values = pd.concat([c for c in trained if not c.empty] or [pd.Series([0.0, 1.0])])
            log = column == "nll" and bool((values > 0).all())  # a regression NLL may be negative
            low, high = float(values.min()), float(values.max())
            if log:
                low, high = low / 1.15, high * 1.15
            else:
                pad = 0.05 * (high - low) or 0.05
                low, high = low - pad, high + pad
            for method in methods:
                rows = table[table["method"] == method]
                curve = _curve(rows, column)
                if curve.empty:
                    continue
                seeds = rows["seed"].nunique()
                name = method if seeds == 1 else f"{method} ({seeds} seeds)"
                if method in BASELINES:
                    baseline = BASELINES[method]
                    marker = MARKERS[baseline.scope, baseline.finetuned]
                    for epoch, value in curve.items():
                        shown = min(max(value, low), high)
                        ax.plot(epoch, shown, marker, ms=10, color=colours[method], label=name, clip_on=False)
                        if shown != value:  # off the curves' scale: at the edge, value written beside it
                            edge = "high" if value > high else "low"
                            rise = (1 if edge == "low" else -1) * 10 * off_scale[edge]
                            off_scale[edge] += 1
                            ax.annotate(
                                f"{method} {value:.3g}", (epoch, shown), textcoords="offset points",
                                xytext=(-10, rise), ha="right", va="center", fontsize=7, color=colours[method],
                            )  # fmt: skip
                        name = None
                else:
                    ax.plot(
                        curve.index,
                        curve.values,
                        "-",
                        marker="." if len(curve) < 60 else None,
                        color=colours[method],
                        label=name,
                    )
            if log:
                ax.set_yscale("log")
            ax.set_ylim(low, high)
            ax.set_xlabel("epoch")
            ax.set_title(label + (" (log axis)" if log else ""))
            ax.grid(alpha=0.3)
        labelled = {}
        for ax in axes:
            for handle, text in zip(*ax.get_legend_handles_labels()):
                labelled.setdefault(text, handle)
        fig.legend(labelled.values(), labelled.keys(), loc="lower center", ncol=min(len(labelled), 8), fontsize=8,
                   bbox_to_anchor=(0.5, -0.1), frameon=False)  # fmt: skip
        fig.suptitle(f"{net} on {data}")
        paths += _save(fig, folder, f"curves-{data}-{net}")
    return paths


@torch.no_grad()
def posterior_summary(run_folder: Path) -> dict:
    """``{"weights": {layer: |posterior-mean weight|}, "delta_f": {layer: dF of live weights}, "pruned": f}``
    of a trained run (dF only for posteriors with spread)."""
    from pyrozoo.bmr.scores import delta_f
    from pyrozoo.bmr.units import pruned_fraction

    run = load(run_folder, log=lambda text: None)
    weights = run.model.weights_from(run.guide.mean())
    summary = {
        "weights": {
            layer.name: weights[layer.name].abs().flatten().cpu().numpy() for layer in run.model.layers
        },
        "delta_f": {},
        "pruned": pruned_fraction(run.model),
    }
    if not run.guide.point_mass:
        for name, df in delta_f(run.model, run.guide).items():
            live = run.model.mask(name).bool()
            summary["delta_f"][name] = df[live].cpu().double().numpy()
    return summary


def plot_weight_cdf(summaries: dict[str, dict], title: str, folder: Path, stem: str) -> list[Path]:
    """Per layer, the CDF of |posterior-mean weight| of each run in ``summaries`` (method -> summary)."""
    layers = list(next(iter(summaries.values()))["weights"])
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.2), squeeze=False)
    colours = _colours(summaries)
    for ax, layer in zip(axes[0], layers):
        for method, summary in summaries.items():
            w = np.sort(np.maximum(summary["weights"][layer], CDF_FLOOR))
            # at most CDF_POINTS steps: a million-point line makes a huge PDF and looks the same
            at = np.unique(np.linspace(0, len(w) - 1, min(len(w), CDF_POINTS)).round().astype(int))
            ax.step(w[at], (at + 1) / len(w), where="post", color=colours[method], label=method)
        ax.set_xscale("log")
        ax.set_xlabel(f"|posterior-mean weight| (0 at {CDF_FLOOR:g})")
        ax.set_title(layer, fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("CDF")
    axes[0][0].legend(
        [f"{m} (pruned {s['pruned']:.2f})" for m, s in summaries.items()], fontsize=8, loc="upper left"
    )
    fig.suptitle(title)
    return _save(fig, folder, stem)


def _symlog_bins(values: np.ndarray, per_decade: int = 8) -> np.ndarray:
    """Bin edges of equal width on the symmetric-log axis (linear inside |dF| < 1, whose halves span a decade
    each, logarithmic beyond), so that bin heights compare across the axis."""
    low, high = float(values.min()), float(values.max())
    edges = [np.linspace(-1, 1, 2 * per_decade + 1)]
    for end, sign in ((-low, -1), (high, 1)):
        if end > 1:
            decades = max(1, int(np.ceil(np.log10(end))))
            edges.append(sign * np.logspace(0, decades, decades * per_decade + 1))
    return np.unique(np.concatenate(edges))


def plot_delta_f(summaries: dict[str, dict], title: str, folder: Path, stem: str) -> list[Path]:
    """Per prunable layer, the histogram of dF over the live weights of each run in ``summaries``."""
    summaries = {m: s for m, s in summaries.items() if s["delta_f"]}
    layers = list(next(iter(summaries.values()))["delta_f"])
    fig, axes = plt.subplots(1, len(layers), figsize=(3.4 * len(layers), 3.2), squeeze=False)
    colours = _colours(summaries)
    for ax, layer in zip(axes[0], layers):
        for method, summary in summaries.items():
            df = summary["delta_f"][layer]
            if len(df):
                ax.hist(
                    df,
                    bins=_symlog_bins(df),
                    weights=np.full(len(df), 1 / len(df)),
                    histtype="step",
                    color=colours[method],
                    label=f"{method} ({len(df)} live)",
                )
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xscale("symlog", linthresh=1)
        ax.xaxis.set_major_locator(SymmetricalLogLocator(linthresh=1, base=100))  # ticks two decades apart
        ax.set_yscale("log")  # most live weights sit at dF ~ 0; the tails that decide pruning are rare
        ax.set_xlabel("dF (> 0: removal raises the evidence)")
        ax.set_title(layer, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("fraction of live weights")
    fig.suptitle(title)
    return _save(fig, folder, stem)


def posterior_summaries(results: pd.DataFrame, folder: Path, log=print) -> dict[tuple, dict]:
    """Per (data, net, seed), the posterior summary of each method's run folder of ``folder`` (first seed of
    each dataset and net): every run file read, and refused if bad, before any figure is drawn."""
    out = {}
    for (data, net), table in results.groupby(["data", "net"], sort=False):
        seed = int(table["seed"].min())
        summaries = out.setdefault((data, net, seed), {})
        for method in dict.fromkeys(table["method"]):
            run_folder = folder / f"{net}-{method}-{data}-s{seed}"
            if method in BASELINES:
                continue
            if not (run_folder / CHECKPOINT).exists():
                log(f"{run_folder}: no {CHECKPOINT}, left out of the weight and dF plots")
                continue
            summaries[method] = posterior_summary(run_folder)
    return out


def plot_posteriors(summaries: dict[tuple, dict], folder: Path) -> list[Path]:
    """Weight CDFs and dF histograms of :func:`posterior_summaries`."""
    paths = []
    for (data, net, seed), by_method in summaries.items():
        title = f"{net} on {data}, seed {seed}"
        pair = {m: by_method[m] for m in CDF_METHODS if m in by_method}
        if len(pair) == len(CDF_METHODS):
            paths += plot_weight_cdf(
                pair, f"{title}: CDF of |posterior-mean weight|", folder, f"weight-cdf-{data}-{net}"
            )
        if any(s["delta_f"] for s in by_method.values()):
            paths += plot_delta_f(by_method, f"{title}: dF per weight", folder, f"delta-f-{data}-{net}")
    return paths


def read_results(path: Path) -> pd.DataFrame:
    """A grid's results.csv, checked for the columns the figures need; a bad file is one PyrozooError."""
    from pyrozoo.compare import ID_COLUMNS

    try:
        results = pd.read_csv(path)
        missing = [c for c in [*ID_COLUMNS, "epoch"] if c not in results]
        if missing:
            raise ValueError(f"no column {', '.join(missing)}")
        if not pd.api.types.is_integer_dtype(results["epoch"]) or not pd.api.types.is_integer_dtype(
            results["seed"]
        ):
            raise ValueError("epoch and seed must be whole numbers")
        unknown = sorted(set(results["method"].astype(str)) - set(METHODS) - set(BASELINES))
        if unknown:
            raise ValueError(f"unknown methods {unknown}")
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise PyrozooError(
            f"{path} is corrupt ({reason(e)}): "
            f"delete it and rerun the grid's pyrozoo compare command, which rebuilds it from the run folders"
        ) from None
    return results


def plot_grid(folder: str | os.PathLike, results: pd.DataFrame | None = None, log=print) -> list[Path]:
    """Every figure of a grid folder, from its results.csv (or ``results``) and its run folders."""
    from pyrozoo.compare import RESULTS

    folder = Path(folder)
    if results is None:
        path = folder / RESULTS
        if not path.exists():
            raise PyrozooError(f"{folder} has no {RESULTS}: run `pyrozoo compare --out {folder}` first")
        results = read_results(path)
    summaries = posterior_summaries(results, folder, log)  # a bad run file refuses before a figure changes
    return plot_curves(results, folder) + plot_posteriors(summaries, folder)


@torch.no_grad()
def plot_regression_bands(run, path_stem: str | os.PathLike, samples: int = 200, title: str | None = None):
    """A 1-D regression run's predictive mean and its 50% and 95% bands (and the epistemic part alone) over the
    inputs' range and beyond, against the training data (and, for toy1d, the true function and noise). ``run``
    is a :class:`pyrozoo.trained.TrainedRun` or a run folder."""
    from pyrozoo import data as datasets
    from pyrozoo.predict import predict

    if isinstance(run, (str, os.PathLike)):
        with load(run, log=lambda _: None) as opened:
            return plot_regression_bands(opened, path_stem, samples, title)
    data = run.data
    if data.task != "regress" or data.x_train.shape[1] != 1:
        raise PyrozooError("the band figure is for regression on one input feature")
    mean, std = float(data.mean[0]), float(data.std[0])
    x_train = (data.x_train.flatten().cpu() * std + mean).numpy()
    y_train = (data.y_mean + data.y_std * data.y_train.double().cpu()).numpy()
    span = x_train.max() - x_train.min()
    grid = np.linspace(x_train.min() - 0.25 * span, x_train.max() + 0.25 * span, 400)
    x = torch.tensor((grid - mean) / std, dtype=torch.float32, device=data.x_train.device).reshape(-1, 1, 1, 1)
    out = predict(run.model, run.guide, x, samples, y_mean=data.y_mean, y_std=data.y_std, seed=run.config.seed)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.scatter(x_train, y_train, s=4, color="0.6", label="training data")
    if data.name == "toy1d":
        truth = datasets.toy1d_mean(grid)
        ax.plot(grid, truth, "k--", lw=1, label="true mean")
        for z in (-1.96, 1.96):
            ax.plot(grid, truth + z * datasets.toy1d_noise_std(grid), "k:", lw=0.8)
    ax.fill_between(grid, out["lower95"], out["upper95"], alpha=0.2, color="C0", label="95% predictive")
    ax.fill_between(grid, out["lower50"], out["upper50"], alpha=0.35, color="C0", label="50% predictive")
    epistemic = 1.96 * out["epistemic_std"].numpy()
    ax.fill_between(grid, out["mean"] - epistemic, out["mean"] + epistemic, alpha=0.35, color="C1",
                    label="mean ± 1.96 epistemic sd")  # fmt: skip
    ax.plot(grid, out["mean"], color="C0", lw=1.5, label="predictive mean")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.set_title(title or f"{run.config.net} {run.config.method} on {data.name}")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    stem = Path(path_stem)
    return _save(fig, stem.parent, stem.name)


def plot_sweep(table: pd.DataFrame, folder: Path, stem: str = "sweep") -> list[Path]:
    """The accuracy-sparsity curve (``pyrozoo sweep``): accuracy, NLL and ECE (a regression's RMSE, NLL and 90%
    coverage) against the pruned fraction, one line per method (dashed: after fine-tuning; dotted: a reduced
    posterior's predictive, ``glm`` or ``samples``), the dense net as a grey line.
    """
    dense = table[table.method == "dense"].iloc[0]
    # each row's predictive: point (the pruned net), or glm / samples (a reduced posterior's draws)
    curves = table[table.method != "dense"].assign(how=table.get("predictive", "point"))
    colours = _colours(list(dict.fromkeys(curves.method)))
    panels = REGRESSION_CURVES if "rmse" in table else CURVES
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (column, label) in zip(axes[0], panels):
        ax.axhline(dense[column], color="grey", lw=1, label="dense")
        for (method, steps, how), rows in curves.groupby(["method", "finetune_steps", "how"], sort=False):
            rows = rows.sort_values("target")
            ax.plot(
                rows.sparsity,
                rows[column],
                marker="o" if how == "point" else "s",
                ms=3,
                color=colours[method],
                ls="--" if steps else "-" if how == "point" else ":",
                label=method + (f" +{steps} steps" if steps else "") + ("" if how == "point" else f" {how}"),
            )
        ax.set_xlabel("pruned fraction (logit scale)")
        ax.set_ylabel(label)
        ax.set_xscale("logit")
        ticks = sorted(curves.target.unique())
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{dense.get('net', '')} on {dense.get('data', '')}: one-shot pruning of one trained net")
    fig.tight_layout()
    return _save(fig, Path(folder), stem)


def epoch_seconds(metrics: pd.DataFrame) -> pd.Series:
    """Training seconds of each epoch (``metrics.csv`` holds the running total), indexed by epoch."""
    seconds = metrics.set_index("epoch")["seconds"].astype(float)
    return seconds.diff().fillna(seconds.iloc[0])


def plot_epoch_times(runs: dict[str, pd.DataFrame], folder: Path, stem: str) -> list[Path]:
    """Seconds per epoch against epoch for each run (``{label: metrics}``, e.g. a run with compaction and its
    twin without), with each run's pruned fraction on a second axis: where training gets cheaper as it prunes.
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    pruned_ax = ax.twinx()
    colours = _colours(list(runs))
    for label, metrics in runs.items():
        seconds = epoch_seconds(metrics)
        ax.plot(seconds.index, seconds.values, marker="o", ms=3, color=colours[label], label=label)
        rows = metrics.set_index("epoch")
        pruned_ax.plot(rows.index, rows.pruned_fraction, ls=":", color=colours[label])
    ax.set_xlabel("epoch")
    ax.set_ylabel("training seconds per epoch (solid)")
    ax.set_ylim(bottom=0)
    pruned_ax.set_ylabel("pruned fraction (dotted)")
    pruned_ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return _save(fig, make_folder(folder), stem)


def plot_front(table: pd.DataFrame, folder: str | os.PathLike, stem: str = "front") -> list[Path]:
    """``pyrozoo compress``'s figure: test accuracy against CPU latency (batch 256, a fraction of the dense
    net's) for every method at every target, each method's points joined in order of latency, the dense net a
    star (and with the same fine-tune, a cross): where one method's curve lies above another's, it is the more
    accurate at that speed."""
    reference = table.method.isin(["dense", "dense+finetune"])
    rows = table[~reference]
    # in the table's order, not the latencies': pyrozoo first, in the same colour in every report
    colours = _colours(list(dict.fromkeys(rows.method)))
    kind = rows.target.str.partition("=")[0]
    # a kind of target by its line and its marker: one target of a kind is one point, with no line to tell by
    styles = dict(zip(dict.fromkeys(kind), [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]))
    fig, ax = plt.subplots(figsize=(6, 4))
    # a method's nets for one kind of target joined in order of latency: targets of two kinds are two fronts
    for (method, of), points in rows.assign(kind=kind).groupby(["method", "kind"], sort=False):
        points = points.sort_values("latency_b256")
        label = method if len(styles) == 1 else f"{method} ({of} targets)"
        line, marker = styles[of]
        ax.plot(points.latency_b256, points.accuracy, marker=marker, ms=5, color=colours[method], ls=line,
                label=label)  # fmt: skip
    for method, marker in (("dense", "*"), ("dense+finetune", "P")):
        points = table[table.method == method]
        ax.plot(
            points.latency_b256, points.accuracy, marker=marker, ms=10, ls="", color="black", label=method
        )
    ax.set_xlabel("CPU latency at batch 256 (fraction of the dense net's)")
    ax.set_ylabel("test accuracy (pruned nets: after the same fine-tune)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(folder), stem)


def plot_ood(rows: dict[str, tuple], folder: Path, stem: str, ood: str = "OOD", bins: int = 15) -> list[Path]:
    """``uncertainty --ood``'s figure, one column per row of its table (``label -> (inside, y, outside)``, the
    predictions on the test set, its labels and the predictions on the OOD set): the predictive entropy's
    histograms on the test set and on the OOD set, and the reliability diagram on the test set (accuracy against
    confidence in ``bins`` equal-width bins, with the equal-width ECE)."""
    from pyrozoo.metrics import ece_equal_width, reliability

    fig, axes = plt.subplots(2, len(rows), figsize=(3.2 * len(rows), 6.0), squeeze=False)
    for k, (label, (inside, y, outside)) in enumerate(rows.items()):
        top, bottom = axes[0, k], axes[1, k]
        most = float(np.log(inside["probs"].shape[1]))  # the entropy of a uniform prediction
        edges = np.linspace(0, most, 31)
        top.hist(inside["entropy"].numpy(), edges, density=True, alpha=0.6, label="test set")
        top.hist(outside["entropy"].numpy(), edges, density=True, alpha=0.6, label=ood)
        top.set(title=label, xlabel="predictive entropy (nats)", ylabel="density" if k == 0 else None)
        count, confidence, hits = (t.numpy() for t in reliability(inside["probs"], y, bins))
        seen = count > 0
        width = 1.0 / bins
        centres = (np.arange(bins) + 0.5) * width
        bottom.bar(centres[seen], hits[seen] / count[seen], width=width, edgecolor="k", label="accuracy")
        bottom.plot(confidence[seen] / count[seen], hits[seen] / count[seen], "r.", label="at mean confidence")
        bottom.plot([0, 1], [0, 1], "k--", lw=1)
        ece = ece_equal_width(inside["probs"], y, bins)
        bottom.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", title=f"ECE ({bins} bins) {ece:.3f}")
        if k == 0:
            bottom.set_ylabel("accuracy")
            top.legend(fontsize="small")
            bottom.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    return _save(fig, folder, stem)
