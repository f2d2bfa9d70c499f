"""Predictive metrics over posterior samples (docs/method.md#metrics): accuracy, NLL, LPD, Brier and two ECEs.

Everything is computed in float64: NLL and LPD are differences of logsumexps over many samples and points,
where float32 rounding would show up in the reported digits.
"""

import math
from typing import Callable, Iterable

import torch
from torch import Tensor

from pyrozoo.errors import PyrozooError


def nll(ll: Tensor) -> float:
    """Per-point NLL of the posterior-predictive mixture: -mean_n (logsumexp_s ll[s, n] - ln S)."""
    ll = ll.double()
    return -(torch.logsumexp(ll, dim=0) - math.log(ll.shape[0])).mean().item()


def lpd(ll: Tensor) -> float:
    """Joint log predictive density per point: (logsumexp_s sum_n ll[s, n] - ln S) / N."""
    ll = ll.double()
    return ((torch.logsumexp(ll.sum(dim=1), dim=0) - math.log(ll.shape[0])) / ll.shape[1]).item()


def accuracy(mean_probs: Tensor, targets: Tensor) -> float:
    """Fraction of points whose posterior-mean argmax is the target."""
    return (mean_probs.argmax(dim=1) == targets).double().mean().item()


def brier(mean_probs: Tensor, targets: Tensor) -> float:
    """Mean over points of sum over classes of (p - onehot)^2; lies in [0, 2]."""
    onehot = torch.nn.functional.one_hot(targets, mean_probs.shape[1]).double()
    return ((mean_probs.double() - onehot) ** 2).sum(dim=1).mean().item()


def _confidence_and_hits(mean_probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    confidence, predicted = mean_probs.double().max(dim=1)
    return confidence, (predicted == targets).double()


def ece_equal_mass(mean_probs: Tensor, targets: Tensor, bins: int = 20) -> float:
    """ECE over `bins` groups of (nearly) equal count, split like numpy.array_split after a stable sort."""
    confidence, hits = _confidence_and_hits(mean_probs, targets)
    order = torch.sort(confidence, stable=True).indices
    # tensor_split splits like numpy.array_split; with N < bins the extra groups are empty and add nothing,
    # which is the same as N one-point bins. n_b/N * |acc_b - conf_b| = |sum hits - sum conf|_b / N.
    groups = zip(confidence[order].tensor_split(bins), hits[order].tensor_split(bins))
    gaps = [(h.sum() - c.sum()).abs() for c, h in groups]
    return (torch.stack(gaps).sum() / confidence.shape[0]).item()


def reliability(mean_probs: Tensor, targets: Tensor, bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Per confidence bin (k/B, (k+1)/B] (confidence 0 in the first): the number of points, the sum of their
    confidences and the number of them predicted right; a reliability diagram plots hits/count against
    confidence/count."""
    confidence, hits = _confidence_and_hits(mean_probs, targets)
    # Inner edges from linspace, so a confidence equal to k/B lands in bin k-1 as the edges are written.
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=confidence.device)[1:-1]
    index = torch.bucketize(confidence, edges)  # right-closed bins; 0 falls in the first
    sums = torch.zeros(3, bins, dtype=torch.float64, device=confidence.device)
    sums.index_add_(1, index, torch.stack([torch.ones_like(confidence), confidence, hits]))
    return sums[0], sums[1], sums[2]


def ece_equal_width(mean_probs: Tensor, targets: Tensor, bins: int = 15) -> float:
    """ECE with bins (k/B, (k+1)/B]; confidence 0 goes in the first bin; empty bins add nothing."""
    count, confidence, hits = reliability(mean_probs, targets, bins)
    return ((hits - confidence).abs().sum() / count.sum()).item()


class _LogSumExp:
    """A running ``logsumexp`` of values given a few at a time, elementwise over ``shape``: the largest value so
    far and the sum of ``exp(value - largest)``, rescaled when a larger one arrives, as ``torch.logsumexp``
    would compute it at once."""

    def __init__(self, shape, device) -> None:
        self.top = torch.full(shape, -math.inf, dtype=torch.float64, device=device)
        self.total = torch.zeros(shape, dtype=torch.float64, device=device)

    def add(self, values: Tensor, where=...) -> None:
        top = torch.maximum(self.top[where], values)
        # where every value so far is -inf, shift by 0: exp(-inf) = 0 then, not exp(nan)
        shift = torch.where(torch.isneginf(top), 0.0, top)
        self.total[where] = self.total[where] * (self.top[where] - shift).exp() + (values - shift).exp()
        self.top[where] = top

    def result(self) -> Tensor:
        return self.top + self.total.log()


class PredictionAccumulator:
    """Collects test predictions batch by batch and sample by sample in O(N*C) memory, whatever the number of
    samples S: never S*N*C, nor S*N.

    Kept per point: a running logsumexp over samples of the true class's log-probability (for NLL) and the
    running sum over samples of the class probabilities (for accuracy, Brier and ECE: the posterior mean). Per
    sample still being added: its next point and its sum of log-probabilities over the points so far; once a
    sample has every point, that sum joins a running logsumexp over samples (for LPD) and only a flag is kept.
    A sample's points must come in order, in batches; samples may interleave.
    """

    def __init__(self, targets: Tensor, num_samples: int, num_classes: int) -> None:
        self.targets = targets.long()
        self.num_samples = num_samples
        self.num_classes = num_classes
        device = self.targets.device
        n = self.targets.shape[0]
        self.points = n
        self.point_lse = _LogSumExp((n,), device)
        self.prob_sum = torch.zeros(n, num_classes, dtype=torch.float64, device=device)
        self.joint_lse = _LogSumExp((), device)
        # Adding a (sample, point) twice or never would silently bias the metrics: track coverage.
        self.open: dict[int, list] = {}  # sample -> [next point, sum of its log-probabilities so far]
        self.done = torch.zeros(num_samples, dtype=torch.bool)

    def add(self, sample_index: int, start: int, log_probs: Tensor) -> None:
        """Record log-softmax outputs [B, C] of points start..start+B under sample `sample_index`."""
        stop = start + log_probs.shape[0]
        if not 0 <= sample_index < self.num_samples or start < 0 or stop > self.points:
            shape = (self.num_samples, self.points)
            raise PyrozooError(f"sample {sample_index}, points {start}..{stop} lie outside {shape}")
        if log_probs.shape[1] != self.num_classes:
            raise PyrozooError(f"expected {self.num_classes} classes, got {log_probs.shape[1]}")
        state = self.open.get(sample_index, [0, 0.0])
        if self.done[sample_index] or start != state[0]:
            if self.done[sample_index] or start < state[0]:
                raise PyrozooError(f"sample {sample_index}, points {start}..{stop} were already added")
            raise PyrozooError(f"sample {sample_index}: points {state[0]}..{start} were skipped")
        log_probs = log_probs.detach().to(self.prob_sum.device, torch.float64)
        ll = log_probs.gather(1, self.targets[start:stop, None]).squeeze(1)
        self.point_lse.add(ll, slice(start, stop))
        self.prob_sum[start:stop] += log_probs.exp()
        state[0], state[1] = stop, state[1] + ll.sum()
        self.open[sample_index] = state
        if stop == self.points:
            self.joint_lse.add(torch.as_tensor(state[1], dtype=torch.float64))
            self.done[sample_index] = True
            del self.open[sample_index]

    def result(self) -> dict[str, float]:
        """All metrics; every (sample, point) must have been added exactly once."""
        if not self.done.all():
            missing = sum(self.points - next_point for next_point, _ in self.open.values())
            missing += self.points * (int((~self.done).sum()) - len(self.open))
            raise PyrozooError(f"{missing} (sample, point) predictions were never added")
        mean_probs = self.prob_sum / self.num_samples
        log_s = math.log(self.num_samples)
        return {
            "accuracy": accuracy(mean_probs, self.targets),
            "nll": -(self.point_lse.result() - log_s).mean().item(),
            "ece": ece_equal_mass(mean_probs, self.targets, bins=20),
            "ece15": ece_equal_width(mean_probs, self.targets, bins=15),
            "brier": brier(mean_probs, self.targets),
            "lpd": ((self.joint_lse.result() - log_s) / self.points).item(),
        }


def evaluate_draws(
    draws: Iterable[Callable[[Tensor], Tensor]],
    x: Tensor,
    y: Tensor,
    num_classes: int,
    samples: int,
    batch_size: int = 2000,
) -> dict[str, float]:
    """The one evaluation loop: each draw maps a batch of inputs to log-probabilities [B, C] (a posterior sample
    of a Bayesian net, or a deterministic net as its one draw), or a group of K posterior samples at once to
    [K, B, C]; ``samples`` draws in all. All metrics over ``(x, y)``; each point receives its samples in draw
    order, whether grouped or not, so grouping changes no sum's order.
    """
    accumulator = PredictionAccumulator(y, samples, num_classes)
    first = 0  # the index of the draw's (or group's first) sample
    for draw in draws:
        group = 1
        for start in range(0, len(x), batch_size):
            log_probs = draw(x[start : start + batch_size])
            if log_probs.dim() == 2:
                log_probs = log_probs[None]
            group = len(log_probs)
            for k in range(group):
                accumulator.add(first + k, start, log_probs[k])
        first += group
    return accumulator.result()


@torch.no_grad()
def evaluate_net(
    net: torch.nn.Module, x: Tensor, y: Tensor, num_classes: int, batch_size: int = 2000, world=None
) -> dict:
    """The metrics of a deterministic classifier (one 'posterior sample'), in eval mode; in a run of several
    processes (``world``, every one calling this), each computes its part of every batch and all get the metrics
    of the whole (:meth:`pyrozoo.distributed.World.sharded`)."""
    training = net.training
    net.eval()
    draw = lambda xb: torch.log_softmax(net(xb), dim=-1)  # noqa: E731
    metrics = evaluate_draws(
        [draw if world is None else world.sharded(draw)], x, y, num_classes, 1, batch_size
    )
    net.train(training)
    return metrics


# --- regression ----------------------------------------------------------------------------------------------

INTERVALS = (0.5, 0.9, 0.95)  # central predictive intervals whose coverage is reported


def mixture_quantile(loc: Tensor, scale: Tensor, q: float | Tensor, iterations: int = 50) -> Tensor:
    """Per point ``n``, the ``q``-quantile of the equal-weight Gaussian mixture ``mean_s N(loc[s, n],
    scale[s, n]^2)`` (the posterior predictive of a Gaussian likelihood), by bisection on its CDF, in float64.
    ``q`` may be a 1-D tensor of levels: then the result is ``[len(q), N]``."""
    loc, scale = loc.double(), scale.double().expand_as(loc)
    levels = torch.as_tensor(q, dtype=torch.float64, device=loc.device)
    qs = levels.reshape(-1, 1)
    z = torch.special.ndtri(qs)  # [Q, 1]: the quantile lies between the components' own quantiles
    low = (loc.min(dim=0).values - 8 * scale.max(dim=0).values).expand(len(qs), -1)
    high = (loc.max(dim=0).values + 8 * scale.max(dim=0).values).expand(len(qs), -1)
    low = torch.minimum(low, (loc[None] + z[..., None] * scale[None]).min(dim=1).values)
    high = torch.maximum(high, (loc[None] + z[..., None] * scale[None]).max(dim=1).values)
    inverse = scale.reciprocal()
    for _ in range(iterations):  # the CDF is increasing: halve [low, high] around the quantile
        middle = (low + high) / 2
        below = torch.special.ndtr((middle[:, None] - loc[None]) * inverse[None]).mean(dim=1) < qs
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    out = (low + high) / 2
    return out if levels.dim() else out[0]


# (draw, point) pairs a regression's predictive holds at once: points are taken in chunks of about this many
# over the number of draws, so that --samples raises the time and not the memory (each chunk replays the draws).
POINT_DRAWS_AT_ONCE = 2**20


def points_per_chunk(samples: int, points: int) -> int:
    """How many points a regression's predictive over ``samples`` draws takes at once (at least one)."""
    return max(1, min(points, POINT_DRAWS_AT_ONCE // max(1, samples)))


def regression_metrics(
    loc: Tensor, noise_var: Tensor, y: Tensor, y_mean: float = 0.0, y_std: float = 1.0
) -> dict:
    """Predictive metrics of a Gaussian likelihood over posterior draws, in the targets' original units.

    ``loc[s, n]`` is draw ``s``'s mean for point ``n`` and ``noise_var[s]`` (or ``[s, n]``) its noise variance, both
    on standardised targets; ``y`` are standardised targets; ``y = y_mean + y_std * standardised``. Returns RMSE of
    the posterior-mean prediction, the NLL of the posterior-predictive mixture per point (``nll``), the joint
    ``lpd``, and the coverage of the central 50/90/95% predictive intervals (``coverage50`` ...).
    """
    return regression_metrics_in_chunks([(loc, noise_var, y)], y_mean, y_std)


def regression_metrics_in_chunks(
    chunks: Iterable[tuple[Tensor, Tensor, Tensor]], y_mean=0.0, y_std=1.0
) -> dict:
    """:func:`regression_metrics` of chunks ``(loc [S, B], noise_var, y [B])`` of the points, the same draws in
    each: memory is that of one chunk, and with one chunk the result is :func:`regression_metrics`' to the bit.
    """
    levels = torch.tensor(INTERVALS, dtype=torch.float64)
    per_point: dict[str, list[Tensor]] = {}
    joint = 0.0  # per draw, the log-likelihood of every point so far (for LPD)
    for loc, noise_var, y in chunks:
        loc, y = loc.double(), y.double()
        var = noise_var.double()
        var = var.reshape(var.shape + (1,) * (loc.dim() - var.dim())).expand_as(loc)
        scale = var.sqrt()
        # log N(y; loc, var) in original units: the standardised density minus ln y_std
        ll = torch.distributions.Normal(loc, scale).log_prob(y) - math.log(y_std)
        joint = joint + ll.sum(dim=1)
        parts = {"error2": (y_std * (loc.mean(dim=0) - y)).square(), "lse": torch.logsumexp(ll, dim=0)}
        bounds = mixture_quantile(loc, scale, torch.cat([(1 - levels) / 2, (1 + levels) / 2]))
        for i, level in enumerate(INTERVALS):
            lower, upper = bounds[i], bounds[len(INTERVALS) + i]
            parts[f"coverage{round(level * 100)}"] = ((y >= lower) & (y <= upper)).double()
        for key, value in parts.items():
            per_point.setdefault(key, []).append(value)
        samples = len(loc)
    whole = {key: torch.cat(values) for key, values in per_point.items()}
    out = {
        "rmse": whole.pop("error2").mean().sqrt().item(),
        "nll": -(whole.pop("lse") - math.log(samples)).mean().item(),
        "lpd": ((torch.logsumexp(joint, dim=0) - math.log(samples)) / len(whole["coverage50"])).item(),
    }
    return {**out, **{key: value.mean().item() for key, value in whole.items()}}


def input_free_scores(data, targets=None) -> dict[str, float]:
    """The scores on ``targets`` (default: the test set's) of the best prediction that ignores the inputs, which
    a collapsed net can at most reach. Classification: the NLL of the training set's class frequencies (add-one,
    so that no class is impossible) and the accuracy of the targets' most frequent class (no constant does
    better). Regression: the NLL and RMSE of a Normal at the training targets' mean and spread, in original
    units as :func:`regression_metrics` reports them."""
    targets = data.y_test if targets is None else targets
    if data.task == "regress":
        y, test = data.y_train.double(), targets.double()
        ll = torch.distributions.Normal(y.mean(), y.std()).log_prob(test) - math.log(data.y_std)
        rmse = (data.y_std * (test - y.mean())).square().mean().sqrt().item()
        return {"nll": -ll.mean().item(), "rmse": rmse}
    counts = torch.bincount(data.y_train.cpu(), minlength=data.num_classes).double() + 1
    test = targets.cpu()
    majority = torch.bincount(test, minlength=data.num_classes).max().item() / max(len(test), 1)
    return {"nll": -(counts / counts.sum()).log()[test].mean().item(), "accuracy": majority}


BETTER = {"nll": -1, "rmse": -1, "accuracy": 1}  # the sign of "better" for the scores input_free_scores gives
MARGIN = {"nll": 0.01, "rmse": 0.0, "accuracy": 0.01}  # by more than this (nats per point, fraction correct)


def beats(metrics: dict[str, float], reference: dict[str, float]) -> set[str]:
    """The scores of ``reference`` that ``metrics`` beat by more than ``MARGIN`` (a NaN beats nothing)."""
    return {
        key
        for key, value in reference.items()
        if BETTER[key] * (metrics[key] - value) > MARGIN[key]  # NaN: False
    }


@torch.no_grad()
def net_metrics(net: torch.nn.Module, data, likelihood, batch_size: int = 2000) -> dict:
    """The test metrics of a deterministic net on ``data`` (a rebuilt, pruned or Laplace-mean net), for the data's
    task: classification as :func:`evaluate_net`; regression as :func:`regression_metrics` of its one draw, with
    ``likelihood``'s noise (held at a point: ``likelihood.at_point(guide)``), in the targets' original units.
    """
    if data.task != "regress":
        return evaluate_net(net, data.x_test, data.y_test, data.num_classes, batch_size)
    training = net.training
    net.eval()
    x = data.x_test
    means = [likelihood.predictive(net(x[i : i + batch_size]))[0] for i in range(0, len(x), batch_size)]
    net.train(training)
    noise_var = likelihood.precision().reciprocal().reshape(1)
    return regression_metrics(torch.cat(means)[None], noise_var, data.y_test, data.y_mean, data.y_std)


# --- uncertainty -----------------------------------------------------------------------------------------------


def auroc(scores: Tensor, positive: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for telling ``positive`` points from the rest: the probability that
    a random positive scores above a random negative, ties counting one half (Mann-Whitney U). NaN when either
    class is empty."""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # average ranks of tied scores, so ties count one half
    order = torch.argsort(scores, stable=True)
    sorted_scores = scores[order]
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    average = ends - (counts.double() - 1) / 2
    ranks[order] = average[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return (u / (n_pos * n_neg)).item()


def average_precision(scores: Tensor, positive: Tensor) -> float:
    """Area under the precision-recall curve of ``scores`` for finding the ``positive`` points, as scikit-learn's
    ``average_precision_score``: the sum over thresholds (each distinct score, highest first) of the precision
    there times the recall it adds. NaN when there is no positive."""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos = int(positive.sum())
    if n_pos == 0 or len(scores) == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    sorted_scores, hits = scores[order], positive[order].double()
    # a threshold at each distinct score: the last point of each run of ties
    last = torch.cat([torch.nonzero(sorted_scores[1:] != sorted_scores[:-1])[:, 0], torch.tensor([len(scores) - 1])])
    true_pos = hits.cumsum(0)[last]
    precision = true_pos / (last + 1).double()
    recall = true_pos / n_pos
    return (torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum().item()
