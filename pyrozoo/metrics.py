"""Predictive metrics over posterior samples (PAPER.md §6): accuracy, NLL, LPD, Brier and two ECEs.

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


def ece_equal_width(mean_probs: Tensor, targets: Tensor, bins: int = 15) -> float:
    """ECE with bins (k/B, (k+1)/B]; confidence 0 goes in the first bin; empty bins add nothing."""
    confidence, hits = _confidence_and_hits(mean_probs, targets)
    # Inner edges from linspace, so a confidence equal to k/B lands in bin k-1 as the edges are written.
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64, device=confidence.device)[1:-1]
    index = torch.bucketize(confidence, edges)  # right-closed bins; 0 falls in the first
    gap = torch.zeros(bins, dtype=torch.float64, device=confidence.device)
    gap.index_add_(0, index, hits - confidence)
    return (gap.abs().sum() / confidence.shape[0]).item()


class PredictionAccumulator:
    """Collects test predictions batch by batch and sample by sample in O(S*N + N*C) memory, never S*N*C.

    Only two things are kept: ll[s, n], the log-probability of the true class (for NLL and LPD), and the
    running sum over samples of the class probabilities (for accuracy, Brier and ECE: the posterior mean).
    """

    def __init__(self, targets: Tensor, num_samples: int, num_classes: int) -> None:
        self.targets = targets.long()
        self.num_samples = num_samples
        self.num_classes = num_classes
        device = self.targets.device
        n = self.targets.shape[0]
        self.ll = torch.zeros(num_samples, n, dtype=torch.float64, device=device)
        self.prob_sum = torch.zeros(n, num_classes, dtype=torch.float64, device=device)
        # Adding a (sample, point) twice or never would silently bias the posterior mean: track coverage.
        self.seen = torch.zeros(num_samples, n, dtype=torch.bool, device=device)

    def add(self, sample_index: int, start: int, log_probs: Tensor) -> None:
        """Record log-softmax outputs [B, C] of points start..start+B under sample `sample_index`."""
        stop = start + log_probs.shape[0]
        if not 0 <= sample_index < self.num_samples or start < 0 or stop > self.ll.shape[1]:
            shape = tuple(self.ll.shape)
            raise PyrozooError(f"sample {sample_index}, points {start}..{stop} lie outside {shape}")
        if log_probs.shape[1] != self.num_classes:
            raise PyrozooError(f"expected {self.num_classes} classes, got {log_probs.shape[1]}")
        if self.seen[sample_index, start:stop].any():
            raise PyrozooError(f"sample {sample_index}, points {start}..{stop} were already added")
        log_probs = log_probs.detach().to(self.ll.device, torch.float64)
        self.ll[sample_index, start:stop] = log_probs.gather(1, self.targets[start:stop, None]).squeeze(1)
        self.prob_sum[start:stop] += log_probs.exp()
        self.seen[sample_index, start:stop] = True

    def result(self) -> dict[str, float]:
        """All metrics; every (sample, point) must have been added exactly once."""
        if not self.seen.all():
            missing = int((~self.seen).sum())
            raise PyrozooError(f"{missing} (sample, point) predictions were never added")
        mean_probs = self.prob_sum / self.num_samples
        return {
            "accuracy": accuracy(mean_probs, self.targets),
            "nll": nll(self.ll),
            "ece": ece_equal_mass(mean_probs, self.targets, bins=20),
            "ece15": ece_equal_width(mean_probs, self.targets, bins=15),
            "brier": brier(mean_probs, self.targets),
            "lpd": lpd(self.ll),
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
    net: torch.nn.Module, x: Tensor, y: Tensor, num_classes: int, batch_size: int = 2000
) -> dict:
    """The metrics of a deterministic classifier (one 'posterior sample'), in eval mode."""
    training = net.training
    net.eval()
    metrics = evaluate_draws(
        [lambda xb: torch.log_softmax(net(xb), dim=-1)], x, y, num_classes, 1, batch_size
    )
    net.train(training)
    return metrics
