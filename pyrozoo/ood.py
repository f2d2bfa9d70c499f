"""Out-of-distribution detection, and the cheap baselines a posterior is measured against.

A classifier should be less sure of inputs unlike its training data. :func:`ood_scores` measures how well a
score tells the out-of-distribution inputs (positives) from the in-distribution test set: the AUROC and the
area under the precision-recall curve (AUPR, as scikit-learn's average precision), of the predictive entropy
(total uncertainty) and, when the predictive is a mixture, of the mutual information (its epistemic part).

The baselines give the same per-input predictions as :func:`pyrozoo.predict.predict`, so every row of the table
is scored alike: :func:`mc_dropout` (a plain net's dropout kept on at test time, Gal & Ghahramani 2016) and
:func:`ensemble` (the mean of several nets' probabilities, Lakshminarayanan et al. 2017; its mutual information
is the members' disagreement).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from pyrozoo.errors import PyrozooError
from pyrozoo.metrics import auroc, average_precision
from pyrozoo.predict import classification_summary, evaluating, mixture, mixture_of_logits, read_inputs

# the table's columns, as printed (the CSV keeps every column of classification_summary too)
SHOWN = (
    "accuracy",
    "nll",
    "ece",
    "ood_entropy_auroc",
    "ood_mi_auroc",
    "ood_entropy_aupr",
    "ood_mi_aupr",
)
FILES = (".npy", ".pt", ".csv")  # an --ood file pyrozoo.predict.read_inputs reads


def ood_name(spec: str) -> str:
    """A short name of the out-of-distribution set: the dataset's, or the file's stem."""
    return Path(spec).stem if spec.lower().endswith(FILES) else spec


def ood_inputs(spec: str, raw, data_dir=None) -> Tensor:
    """The raw inputs of the out-of-distribution set ``spec``, in the layout of the run's data ``raw``: a
    dataset's test split (any dataset pyrozoo reads), or the inputs of a file as ``predict --input`` reads
    them. Inputs of another shape than the run's are refused."""
    from pyrozoo import data as datasets

    if spec.lower().endswith(FILES):
        return read_inputs(spec, raw)[0]
    other = datasets.load(spec, data_dir)
    theirs, ours = tuple(other.x_test.shape[1:]), tuple(raw.x_test.shape[1:])
    if theirs != ours or other.x_test.is_floating_point() != raw.x_test.is_floating_point():
        raise PyrozooError(
            f"--ood {spec} has inputs of shape {theirs}, but the run was trained on {raw.name}'s {ours}: the "
            "out-of-distribution set must have the run's input shape (pyrozoo does not resize); give a dataset "
            f"of that shape ({', '.join(_same_shape(raw))}) or a .npy/.pt file of such images"
        )
    return other.x_test


def _same_shape(raw) -> list[str]:
    from pyrozoo.data import DATASETS

    c, h, w = raw.x_test.shape[1:]
    return [
        name
        for name, info in DATASETS.items()
        if info.task == "classify" and (info.channels, info.image_size, info.image_size) == (c, h, w)
    ]


def ood_scores(inside: dict[str, Tensor], outside: dict[str, Tensor]) -> dict[str, float]:
    """AUROC and AUPR of the entropy, and of the mutual information when both predictions have one, for telling
    ``outside`` (positives) from ``inside``; and the mean entropy outside."""
    positive = torch.cat([torch.zeros(len(inside["entropy"])), torch.ones(len(outside["entropy"]))]).bool()
    out = {"ood_mean_entropy": outside["entropy"].mean().item()}
    for name, key in (("entropy", "entropy"), ("mi", "mutual_information")):
        if key in inside and key in outside:
            scores = torch.cat([inside[key], outside[key]])
            out[f"ood_{name}_auroc"] = auroc(scores, positive)
            out[f"ood_{name}_aupr"] = average_precision(scores, positive)
    return out


def ood_row(inside: dict[str, Tensor], y: Tensor, outside: dict[str, Tensor]) -> dict[str, float]:
    """One row of the table: in-distribution accuracy, NLL, ECE and misclassification AUROCs
    (:func:`pyrozoo.predict.classification_summary`), then the out-of-distribution scores."""
    return {**classification_summary(inside, y), **ood_scores(inside, outside)}


def ensemble(members: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """A deep ensemble's predictions from its members' (each :func:`pyrozoo.predict.predict`'s on the same
    inputs): the mean of their probabilities; a member that is itself a mixture brings its expected entropy.
    """
    if len(members) < 2:
        raise PyrozooError(f"an ensemble needs at least 2 members, got {len(members)}")
    prob_sum = sum(m["probs"] for m in members)
    expected = sum(m.get("expected_entropy", m["entropy"]) for m in members)
    return mixture(prob_sum, expected, len(members))


def dropout_layers(net: nn.Module) -> list[nn.Module]:
    """The net's dropout modules that drop anything (p > 0)."""
    return [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


@torch.no_grad()
def mc_dropout(
    net: nn.Module, x: Tensor, passes: int, seed: int = 0, batch_size: int = 2000
) -> dict[str, Tensor]:
    """MC dropout: the mixture of ``passes`` forward passes of ``net`` with its dropout on (the rest of it, e.g.
    batch norm, in eval mode), from a random stream of their own seeded by ``seed``, so a call gives the same
    predictions every time and leaves the caller's stream as it was."""
    layers = dropout_layers(net)
    if not layers:
        raise PyrozooError(
            "MC dropout needs a net with dropout; this one has none (flat-map trains with dropout 0.2, and "
            "--dropout P sets it for other methods)"
        )
    parts: dict[str, list[Tensor]] = {}
    with evaluating(net), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        for layer in layers:
            layer.train()  # the only part left stochastic
        torch.manual_seed(seed)
        for start in range(0, len(x), batch_size):
            batch = x[start : start + batch_size]
            for key, value in mixture_of_logits((net(batch) for _ in range(passes)), passes).items():
                parts.setdefault(key, []).append(value.cpu())
    return {key: torch.cat(values) for key, values in parts.items()}
