"""Per-input predictions with their uncertainty, from a Bayesian model and its posterior, or a plain net.

:func:`predict` averages ``samples`` posterior draws. The same draws serve every batch of inputs (each batch
replays one seeded random stream), so inputs are streamed in batches in constant memory and a point's result
does not depend on the batch it came in. A Laplace posterior's draws go through the linearised net (its
``predictive``, :mod:`pyrozoo.posteriors.linearised`), every other posterior's through the net itself.

Classification (docs/method.md#metrics; Depeweg et al. 2018 for the decomposition): the posterior-mean
probabilities, the predicted class, the predictive entropy ``H[mean_s p_s]`` (total uncertainty), the expected
entropy ``mean_s H[p_s]`` (aleatoric) and their difference, the mutual information between the label and the
weights (epistemic, >= 0 by Jensen's inequality). Regression: the predictive mean, its standard deviation
split by the law of total variance into an aleatoric part (the noise, ``mean_s 1/tau_s``) and an epistemic
part (the spread of the draws' means), and central intervals of the predictive mixture. A deterministic net is
one draw: it has no epistemic part, and reports none; nor does a single draw of a posterior (a point mass).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator

import pandas as pd
import torch
from pyro import poutine
from torch import Tensor, nn
from tqdm.auto import tqdm

from pyrozoo.errors import PyrozooError
from pyrozoo.metrics import INTERVALS, mixture_quantile, points_per_chunk
from pyrozoo.torchfile import load_tensors


def _draws(model, guide, samples: int, seed: int) -> Iterator[tuple[dict, dict]]:
    """``samples`` posterior draws as ``(weights, latents)``, from a random stream of their own (``seed``), so the
    same draws come back on every call with the same seed and the caller's stream is left as it was."""
    device = model.mask(model.layers[0].name).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), poutine.block():
        torch.manual_seed(seed)
        for _ in range(samples):
            latents = guide()
            yield model.weights_from(latents), latents


def _entropy(log_probs: Tensor) -> Tensor:
    return -(log_probs.exp() * log_probs).nan_to_num().sum(-1)  # 0 log 0 = 0


def mixture(prob_sum: Tensor, expected_sum: Tensor, count: int) -> dict[str, Tensor]:
    """The predictions of an equal mixture of ``count`` predictive distributions (posterior draws, MC dropout
    passes, an ensemble's members), from the sum of their class probabilities and of their (expected) entropies:
    ``probs``, ``class``, ``entropy``, and when ``count > 1`` ``expected_entropy`` and the mutual information
    ``H[mean p] - mean H[p]``; one draw (a point mass, a plain net) has no epistemic part, and reports none.
    """
    probs = prob_sum / count
    entropy = _entropy(probs.log())
    out = {"probs": probs, "class": probs.argmax(-1), "entropy": entropy}
    if count > 1:
        out["expected_entropy"] = expected_sum / count
        # >= 0 by Jensen; float64 rounding alone can take it a hair below
        out["mutual_information"] = (entropy - out["expected_entropy"]).clamp(min=0)
    return out


def mixture_of_logits(logits: Iterable[Tensor], count: int) -> dict[str, Tensor]:
    """:func:`mixture` of the ``count`` categorical predictives whose logits ``logits`` yields (posterior draws,
    MC dropout passes), summed in float64 as they come."""
    prob_sum, expected = 0.0, 0.0
    for out in logits:
        log_probs = torch.log_softmax(out.double(), dim=-1)
        prob_sum = prob_sum + log_probs.exp()
        expected = expected + _entropy(log_probs)
    return mixture(prob_sum, expected, count)


@contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode (no dropout at test time) for the block, then as it was."""
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)


def seeded_draws(model, guide, samples: int, seed: int = 0) -> list[tuple[dict, dict]]:
    """The ``samples`` draws :func:`predict` makes from ``seed``, made once, for a caller that passes them to
    every batch (a reduced KFAC posterior's draw costs a solve per layer)."""
    return list(_draws(model, guide, samples, seed))


def predictive_of(posterior) -> str:
    """How a posterior's draws predict: a Laplace posterior's ``predictive`` (glm, the linearised net, or
    samples), every other's the net at sampled weights."""
    return getattr(posterior, "predictive", "samples")


def draw_outputs(
    model, guide, x: Tensor, samples: int, seed: int = 0, draws: Iterable | None = None
) -> Iterator[tuple[Tensor, dict]]:
    """``(outputs on x, latents)`` of each of ``samples`` seeded posterior draws (the same draws for every ``x``;
    ``draws``: those draws made already): a Laplace posterior's linearised net at them (its ``predictive``,
    glm: :mod:`pyrozoo.posteriors.linearised`), every other posterior's net at the drawn weights. The caller
    holds the model in eval mode."""
    draws = _draws(model, guide, samples, seed) if draws is None else draws
    if predictive_of(guide) == "glm":
        from pyrozoo.posteriors.linearised import linearised_outputs

        return linearised_outputs(model, guide, x, draws)
    return ((model.logits(x, weights), latents) for weights, latents in draws)


@torch.no_grad()
def predict_batch(
    model: nn.Module,
    guide,
    x: Tensor,
    samples: int = 100,
    task: str | None = None,
    seed: int = 0,
    draws: Iterable | None = None,
) -> dict[str, Tensor]:
    """:func:`predict` on one batch, in float64, without the intervals' original-units mapping (``draws``: the
    seeded draws made already, :func:`seeded_draws`)."""
    bayesian = guide is not None
    task = task or (model.likelihood.task if bayesian else "classify")
    with evaluating(model):
        if bayesian:
            outputs = draw_outputs(model, guide, x, samples, seed, draws)
        else:
            outputs, samples = iter([(model(x), None)]), 1
        if task == "classify":
            return mixture_of_logits((out for out, _ in outputs), samples)
        locs, noise = [], []
        for out, latents in outputs:
            mean = out.double()[..., 0]
            locs.append(mean)
            if bayesian:
                noise.append(model.likelihood.predictive(out, latents)[1].double().expand_as(mean))
        return {"locs": torch.stack(locs), "noise_var": torch.stack(noise) if noise else None}


@torch.no_grad()
def predict(
    model: nn.Module,
    guide=None,
    x: Tensor | None = None,
    samples: int = 100,
    *,
    batch_size: int = 2000,
    y_mean: float = 0.0,
    y_std: float = 1.0,
    noise_std: float | None = None,
    task: str | None = None,
    seed: int = 0,
    progress: bool = False,
    y: Tensor | None = None,
) -> dict[str, Tensor]:
    """Per-input predictions of ``model`` (a :class:`~pyrozoo.models.BayesianModel`) under ``guide``'s posterior,
    averaged over ``samples`` draws; with ``guide=None``, of ``model`` as a plain deterministic net (one draw).

    Classification: ``probs`` [N, C], ``class`` [N], ``entropy`` [N] (total), and for a Bayesian model
    ``expected_entropy`` and ``mutual_information`` with ``entropy = expected_entropy + mutual_information``.
    Regression (a Gaussian likelihood; targets standardised with ``y_mean`` and ``y_std``, results in original
    units): ``mean``, ``std`` with its parts ``aleatoric_std`` and ``epistemic_std`` (``std^2`` is the sum of
    their squares) and the central intervals ``lower50``/``upper50``, ``lower90``... of the predictive mixture.
    A deterministic regression net gives ``mean``, and with ``noise_std`` (original units) ``std`` (all
    aleatoric) and intervals.

    With targets ``y`` (class indices; or regression targets standardised as the model's, like ``x``), also per
    input: ``nll``, the negative log density of the target under the predictive (classification: ``-ln
    probs[y]``; regression: of the posterior-predictive mixture, in original units, as
    :func:`pyrozoo.metrics.regression_metrics`' mean ``nll``), and for regression ``error`` (``mean`` minus the
    target, original units).

    Usage::

        out = pyrozoo.predict(run.model, run.guide, x, samples=100)
        out["mutual_information"]
    """
    if x is None:
        raise PyrozooError("predict needs inputs x")
    bayesian = guide is not None
    if bayesian and not hasattr(model, "likelihood"):
        raise PyrozooError("predict with a guide needs the BayesianModel the guide was trained with")
    task = task or (model.likelihood.task if bayesian else "classify")
    if (
        task == "regress"
    ):  # a regression holds [samples, batch] draws: fewer points at a time for more samples
        batch_size = min(batch_size, points_per_chunk(samples, len(x)))
    parts: dict[str, list[Tensor]] = {}
    bar = tqdm(total=len(x), unit="input", desc="predict", disable=not progress, dynamic_ncols=True)
    with bar:
        for start in range(0, len(x), batch_size):
            batch = predict_batch(model, guide, x[start : start + batch_size], samples, task, seed)
            targets = None if y is None else y[start : start + batch_size].to(x.device)
            if task == "regress":
                batch = _regression_summary(batch, y_mean, y_std, noise_std, targets)
            elif targets is not None:
                picked = batch["probs"].gather(1, targets.long()[:, None])[:, 0]
                batch["nll"] = -picked.clamp(min=1e-300).log()
            for key, value in batch.items():
                parts.setdefault(key, []).append(value.cpu())
            bar.update(min(batch_size, len(x) - start))
    return {key: torch.cat(values) for key, values in parts.items()}


def _regression_summary(
    batch: dict, y_mean: float, y_std: float, noise_std: float | None, y: Tensor | None = None
) -> dict[str, Tensor]:
    locs, noise_var = batch["locs"], batch["noise_var"]
    out = {"mean": y_mean + y_std * locs.mean(0)}
    if y is not None:
        out["error"] = out["mean"] - (y_mean + y_std * y.double())
    if noise_var is None:  # a deterministic net: only the noise the caller states
        if noise_std is None:
            return out
        noise_var = torch.full_like(locs, (noise_std / y_std) ** 2)
    aleatoric = noise_var.mean(0)
    epistemic = locs.var(0, unbiased=False)
    out["std"] = y_std * (aleatoric + epistemic).sqrt()
    out["aleatoric_std"] = y_std * aleatoric.sqrt()
    out["epistemic_std"] = y_std * epistemic.sqrt()
    levels = torch.tensor(INTERVALS, dtype=torch.float64)
    bounds = mixture_quantile(locs, noise_var.sqrt(), torch.cat([(1 - levels) / 2, (1 + levels) / 2]))
    for i, level in enumerate(INTERVALS):
        out[f"lower{round(level * 100)}"] = y_mean + y_std * bounds[i]
        out[f"upper{round(level * 100)}"] = y_mean + y_std * bounds[len(INTERVALS) + i]
    if y is not None:  # the mixture's density in original units: the standardised one divided by y_std
        ll = torch.distributions.Normal(locs, noise_var.sqrt()).log_prob(y.double())
        out["nll"] = math.log(y_std) - (torch.logsumexp(ll, 0) - math.log(len(locs)))
    return out


def to_frame(predictions: dict[str, Tensor]) -> pd.DataFrame:
    """One row per input: the class probabilities as ``prob0``, ``prob1``, ... and every per-input value."""
    columns = {}
    for key, value in predictions.items():
        if value.dim() == 2:
            columns.update({f"prob{c}": value[:, c].numpy() for c in range(value.shape[1])})
        else:
            columns[key] = value.numpy()
    return pd.DataFrame(columns)


@torch.no_grad()
def regression_draws(
    model, guide, x: Tensor, samples: int, batch_size: int = 2000, seed: int | None = None
) -> tuple[Tensor, Tensor]:
    """``(locs [S, N], noise_var [S, N])`` of ``samples`` posterior draws on ``x`` (standardised units), for
    :func:`pyrozoo.metrics.regression_metrics`. Without ``seed``, draws come from the current random stream.
    """
    training = model.training
    model.eval()
    locs, noise = [], []
    with poutine.block():
        for _ in range(samples):
            latents = guide()
            weights = model.weights_from(latents)
            loc = torch.cat(
                [model.logits(x[i : i + batch_size], weights)[..., 0] for i in range(0, len(x), batch_size)]
            )
            locs.append(loc)
            noise.append(model.likelihood.predictive(loc[:, None], latents)[1].expand_as(loc))
    model.train(training)
    return torch.stack(locs), torch.stack(noise)


def classification_uncertainty(predictions: dict[str, Tensor], y: Tensor) -> dict[str, float]:
    """Misclassification detection: the AUROC of the predictive entropy, and of the mutual information when
    there is one, for telling wrong predictions (positives) from right ones."""
    from pyrozoo.metrics import auroc

    wrong = predictions["class"] != y.cpu()
    out = {"entropy_auroc": auroc(predictions["entropy"], wrong)}
    if "mutual_information" in predictions:
        out["mi_auroc"] = auroc(predictions["mutual_information"], wrong)
    return out


# --- on a run's data ------------------------------------------------------------------------------------------


def read_inputs(path: str, like, target: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Raw inputs from a file, in the stored layout of the run's data (``like``, a RawData), and their targets
    when the file has them: a CSV of feature columns for tabular data, or a ``.npy``/``.pt`` array of images
    ``(N, H, W)`` or ``(N, C, H, W)`` with pixel values 0..255 (no targets).

    A CSV of a run trained on a CSV table is read by column name (any order); its column ``target`` (the run's
    target), when present, becomes the targets: numbers in the target's units, or class labels of the
    training table (mapped to their class indices). Other tabular runs (toy1d, diabetes) take the feature
    columns in order."""
    import numpy as np

    from pyrozoo.data import _features, check_finite, read_csv

    y = None
    try:
        if path.lower().endswith(".csv"):
            if not like.x_train.is_floating_point():
                raise PyrozooError(
                    f"{path} is a table, but the run was trained on images: give a .npy or .pt"
                )
            table = read_csv(path)
            if target is not None and target in table:
                y = _targets(path, table.pop(target), like)
            names = getattr(like, "feature_names", None)
            if names is not None:
                missing = [n for n in names if n not in table]
                extra = [str(c) for c in table if c not in names]
                if missing or extra:
                    raise PyrozooError(
                        f"{path}: the run's features are the columns {', '.join(names)}"
                        + (f"; missing: {', '.join(missing)}" if missing else "")
                        + (f"; not features of the run: {', '.join(extra)}" if extra else "")
                    )
                table = table[list(names)]
            bad = [str(c) for c in table if not pd.api.types.is_numeric_dtype(table[c])]
            if bad or table.isna().any().any():
                raise PyrozooError(
                    f"{path}: feature columns must be numeric and complete; "
                    f"{', '.join(bad or [str(c) for c in table if table[c].isna().any()])} are not"
                )
            check_finite(path, table)
            x = _features(table.to_numpy(np.float64))
        elif path.lower().endswith(".npy"):
            x = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.lower().endswith(".pt"):
            x = load_tensors(
                path, what=f"--input {path}", fix="save the inputs as a tensor (torch.save(x, path))"
            )
        else:
            raise PyrozooError(f"--input {path}: give a .csv table, or a .npy or .pt array of images")
    except PyrozooError:
        raise
    except FileNotFoundError:
        raise PyrozooError(f"no such file: {path}") from None
    except Exception as e:  # a bad pickle, a bad header, an unparsable table
        raise PyrozooError(f"cannot read {path} ({' '.join(str(e).split())})") from None
    if not like.x_train.is_floating_point():
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1:] != like.x_train.shape[1:]:
            raise PyrozooError(
                f"{path} holds inputs of shape {tuple(x.shape[1:])}, the run's data "
                f"{tuple(like.x_train.shape[1:])}"
            )
        if x.is_floating_point():
            if x.min() < 0 or x.max() > 255:
                raise PyrozooError(f"{path}: pixel values must lie in 0..255")
            x = x.round().to(torch.uint8)
    elif x.shape[1:] != like.x_train.shape[1:]:
        raise PyrozooError(f"{path} has {x.shape[1]} feature columns, the run's data {like.x_train.shape[1]}")
    return x, y


def align_table(other, like) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split of another table ``other`` (a RawData) in the layout of the run's table ``like``: its
    feature columns by name in the run's order, its class labels as the run's class indices."""
    x, y = other.x_test, other.y_test
    names, theirs = like.feature_names, other.feature_names
    if names is not None and theirs is not None and names != theirs:
        if sorted(names) != sorted(theirs):
            raise PyrozooError(
                f"{other.source} has the feature columns {', '.join(theirs)}; the run's are {', '.join(names)}"
            )
        x = x[:, [theirs.index(n) for n in names]]
    if like.class_labels is not None and other.class_labels is not None:
        codes = {str(label): k for k, label in enumerate(like.class_labels)}
        unknown = [str(v) for v in other.class_labels if str(v) not in codes]
        if unknown:
            raise PyrozooError(
                f"{other.source} has labels the run was not trained on: {', '.join(unknown[:5])} "
                f"(its classes: {', '.join(codes)})"
            )
        y = torch.tensor([codes[str(v)] for v in other.class_labels], dtype=torch.int64)[y]
    return x, y


def _targets(path: str, column: pd.Series, like) -> torch.Tensor:
    """A CSV's target column as the run's targets: float numbers (regression), or class indices of the run's
    class labels (classification; a label the run never saw is an error)."""
    name = column.name
    if column.isna().any():
        raise PyrozooError(
            f"{path}: target column {name!r} has missing values; fill them, or drop the column"
        )
    if like.task == "regress":
        if not pd.api.types.is_numeric_dtype(column):
            raise PyrozooError(f"{path}: target column {name!r} is not numeric, the run regresses on it")
        return torch.from_numpy(column.to_numpy(dtype="float32"))
    labels = getattr(like, "class_labels", None)
    if labels is None:  # a named classification set: the column holds class indices
        codes = {str(k): k for k in range(like.num_classes)}
    else:
        codes = {str(label): k for k, label in enumerate(labels)}
    unknown = sorted({str(v) for v in column if str(v) not in codes})
    if unknown:
        raise PyrozooError(
            f"{path}: target column {name!r} has labels the run was not trained on: {', '.join(unknown[:5])} "
            f"(its classes: {', '.join(codes)})"
        )
    return torch.tensor([codes[str(v)] for v in column], dtype=torch.int64)


def prepare_like(run, raw, x_raw: torch.Tensor, y_raw: torch.Tensor | None = None):
    """Inputs (and targets) standardised exactly as the run's test set: with the run's training statistics."""
    import dataclasses

    from pyrozoo import data as datasets
    from pyrozoo.nets import NETS

    if y_raw is None:
        y_raw = torch.zeros(len(x_raw), dtype=raw.y_train.dtype)
    shifted = dataclasses.replace(raw, x_test=x_raw, y_test=y_raw)
    return datasets.prepare(shifted, pad_to=NETS[run.config.net].pad_to, device=run.config.device)


def _predict_run(run, net: nn.Module | None, x: Tensor, samples: int, **options) -> dict[str, Tensor]:
    """:func:`predict` of a run's Bayesian model under its guide, or of ``net``, a plain net made from it."""
    return predict(
        run.model if net is None else net, run.guide if net is None else None, x, samples, **options
    )


def predict_frame(
    run,
    prepared,
    samples: int,
    batch_size: int,
    progress: bool,
    known_targets: bool,
    net: nn.Module | None = None,
):
    """Predictions of a run on prepared data, one row per input (targets and hits when ``known_targets``); with
    ``net``, of that plain net made from the run (a pruned one), a regression's noise the run's."""
    noise_std = None
    if net is not None and prepared.task == "regress":
        noise_std = prepared.y_std * float(run.point_likelihood().precision().rsqrt())
    predictions = _predict_run(
        run,
        net,
        prepared.x_test,
        samples,
        batch_size=batch_size,
        y_mean=prepared.y_mean,
        y_std=prepared.y_std,
        noise_std=noise_std,
        task=prepared.task,
        seed=run.config.seed,
        progress=progress,
        y=prepared.y_test if known_targets else None,
    )
    frame = to_frame(predictions)
    if known_targets:
        y = prepared.y_test.cpu()
        if prepared.task == "regress":
            frame.insert(0, "target", (prepared.y_mean + prepared.y_std * y.double()).numpy())
        else:
            frame.insert(0, "target", y.numpy())
            frame.insert(1, "correct", (predictions["class"] == y).numpy())
    return predictions, frame


def regression_summary(frame: pd.DataFrame) -> dict[str, float]:
    """RMSE, mean NLL and the 50/90/95% interval coverage of per-input regression predictions with targets
    (a :func:`predict_frame` with known targets), in the targets' units."""
    out = {"rmse": math.sqrt((frame["error"] ** 2).mean())}
    if "nll" in frame:
        out["nll"] = frame["nll"].mean()
    for level in INTERVALS:
        lower, upper = f"lower{round(level * 100)}", f"upper{round(level * 100)}"
        if lower in frame:
            hit = (frame["target"] >= frame[lower]) & (frame["target"] <= frame[upper])
            out[f"coverage{round(level * 100)}"] = hit.mean()
    return out


def classification_summary(predictions: dict[str, Tensor], y: Tensor) -> dict[str, float]:
    """Accuracy, NLL and ECE of the posterior-mean probabilities, and misclassification AUROCs."""
    from pyrozoo.metrics import accuracy, ece_equal_mass

    probs, y = predictions["probs"], y.cpu().long()
    out = {
        "accuracy": accuracy(probs, y),
        "nll": -probs.gather(1, y[:, None]).clamp(min=1e-300).log().mean().item(),
        "ece": ece_equal_mass(probs, y, bins=20),
        "mean_entropy": predictions["entropy"].mean().item(),
    }
    if "mutual_information" in predictions:
        out["mean_mi"] = predictions["mutual_information"].mean().item()
    return {**out, **classification_uncertainty(predictions, y)}


def uncertainty_table(
    run, raw, samples: int, batch_size: int = 2000, progress: bool = False, net: nn.Module | None = None
) -> pd.DataFrame:
    """The run's uncertainty on its clean test set and on shifted copies (each shift, each severity): accuracy,
    NLL, ECE, mean entropy and mutual information, and the misclassification AUROCs of entropy and MI; with
    ``net``, of that plain net made from the run (a pruned one)."""
    from pyrozoo.shift import SEVERITIES, SHIFTS

    if raw.x_test.is_floating_point():
        raise PyrozooError(
            f"shifted test sets are made from images; {raw.name}'s inputs are features, not images"
        )
    cases = [("none", 0)] + [(name, k) for name in SHIFTS for k in SEVERITIES]
    rows = []
    for name, severity in tqdm(cases, desc="shifts", disable=not progress, dynamic_ncols=True):
        x = raw.x_test if name == "none" else SHIFTS[name](raw.x_test, severity, seed=run.config.seed)
        prepared = prepare_like(run, raw, x, raw.y_test)
        predictions = _predict_run(
            run, net, prepared.x_test, samples, batch_size=batch_size, seed=run.config.seed
        )
        rows.append(
            {"shift": name, "severity": severity, **classification_summary(predictions, prepared.y_test)}
        )
    return pd.DataFrame(rows)
