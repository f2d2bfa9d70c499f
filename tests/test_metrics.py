"""Metrics on hand-computed examples, the accumulator against the evaluation loop, and property tests."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrozoo.errors import PyrozooError
from pyrozoo.metrics import (
    PredictionAccumulator,
    accuracy,
    brier,
    ece_equal_mass,
    ece_equal_width,
    evaluate_draws,
    lpd,
    nll,
)


def summarize(log_probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Metrics of a full [S, N, C] tensor through the one evaluation loop: each draw maps point indices to
    their log-probabilities, in batches of 7 so that batching is exercised."""
    s, n, c = log_probs.shape
    draws = [lambda idx, lp=lp: lp[idx] for lp in log_probs]
    return evaluate_draws(draws, torch.arange(n), targets, c, s, batch_size=7)


KEYS = {"accuracy", "nll", "ece", "ece15", "brier", "lpd"}


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def _y(labels: list[int]) -> torch.Tensor:
    return torch.tensor(labels, dtype=torch.long)


def test_nll_and_lpd_by_hand_and_they_differ() -> None:
    # True-class probabilities p[s, n]: sample 0 gives (0.8, 0.2), sample 1 gives (0.2, 0.8).
    # NLL: each point's mixture is (0.8 + 0.2) / 2 = 0.5, so NLL = -ln 0.5 = ln 2 = 0.6931.
    # LPD: each sample's joint is 0.8 * 0.2 = 0.16, mean 0.16: LPD = ln(0.16) / 2 = ln 0.4 = -0.9163 < -NLL.
    ll = torch.log(_t([[0.8, 0.2], [0.2, 0.8]]))
    assert nll(ll) == pytest.approx(math.log(2))
    assert lpd(ll) == pytest.approx(math.log(0.4))
    # The other direction: samples (0.9, 0.9) and (0.1, 0.1) keep the mixtures at 0.5 (NLL = ln 2) but the
    # joints are 0.81 and 0.01: LPD = ln(0.41) / 2 = -0.4458 > -NLL = -0.6931. Neither side always wins.
    ll = torch.log(_t([[0.9, 0.9], [0.1, 0.1]]))
    assert nll(ll) == pytest.approx(math.log(2))
    assert lpd(ll) == pytest.approx(math.log(0.41) / 2)


def test_accuracy_by_hand() -> None:
    # Argmaxes 0, 2, 1, 2 against targets 0, 2, 0, 1: two hits out of four.
    probs = _t([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.4, 0.5, 0.1], [0.2, 0.2, 0.6]])
    assert accuracy(probs, _y([0, 2, 0, 1])) == 0.5


def test_accuracy_uses_the_posterior_mean_not_a_vote() -> None:
    # Two samples vote class 0 with (0.51, 0.49); the third says (0, 1). Mean (0.34, 0.66) picks class 1.
    probs = torch.tensor([[[0.51, 0.49]], [[0.51, 0.49]], [[1e-300, 1.0]]], dtype=torch.float64)
    assert summarize(probs.log(), _y([1]))["accuracy"] == 1.0


def test_brier_by_hand() -> None:
    # Point 0, target 0: 0.3^2 + 0.2^2 + 0.1^2 = 0.14. Point 1, target 1: 0.1^2 + 0.7^2 + 0.6^2 = 0.86.
    # Mean (0.14 + 0.86) / 2 = 0.5.
    probs = _t([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    assert brier(probs, _y([0, 1])) == pytest.approx(0.5)


def test_ece_equal_mass_by_hand() -> None:
    # Confidences and hits: A 0.9 hit, B 0.6 miss (predicts 1, target 0), C 0.8 hit, D 0.7 miss.
    # Sorted: B 0.6, D 0.7 | C 0.8, A 0.9.
    # Bin 1: acc 0, conf 0.65, gap 0.65. Bin 2: acc 1, conf 0.85, gap 0.15.
    # ECE = 2/4 * 0.65 + 2/4 * 0.15 = 0.4.
    probs = _t([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]])
    assert ece_equal_mass(probs, _y([0, 0, 1, 1]), bins=2) == pytest.approx(0.4)


def test_ece_equal_mass_splits_like_array_split() -> None:
    # Five points into two bins: sizes 3 then 2 (numpy.array_split), not 2 then 3.
    # Sorted: 0.6 miss, 0.7 miss, 0.8 hit | 0.9 hit, 0.95 hit.
    # Bin 1: acc 1/3, conf 0.7, gap 0.3667; bin 2: acc 1, conf 0.925, gap 0.075.
    # ECE = 3/5 * 0.3667 + 2/5 * 0.075 = 0.22 + 0.03 = 0.25 (sizes 2, 3 would give 0.33).
    probs = _t([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1], [0.95, 0.05]])
    assert ece_equal_mass(probs, _y([1, 1, 0, 0, 0]), bins=2) == pytest.approx(0.25)


def test_ece_equal_mass_ties_keep_input_order() -> None:
    # All four confidences are 0.6; hits in input order 1, 1, 0, 0. A stable sort keeps that order, so the
    # bins are {hit, hit} with gap |1 - 0.6| = 0.4 and {miss, miss} with gap 0.6.
    # ECE = 0.5 * 0.4 + 0.5 * 0.6 = 0.5.
    # (Interleaved hits would give 0.1.)
    probs = _t([[0.6, 0.4]] * 4)
    assert ece_equal_mass(probs, _y([0, 0, 1, 1]), bins=2) == pytest.approx(0.5)


def test_ece_equal_mass_with_fewer_points_than_bins() -> None:
    # Three one-point bins: |1 - 0.9| + |0 - 0.6| + |1 - 0.8| = 0.1 + 0.6 + 0.2 = 0.9, over 3 points = 0.3.
    probs = _t([[0.9, 0.1], [0.6, 0.4], [0.8, 0.2]])
    assert ece_equal_mass(probs, _y([0, 1, 0]), bins=20) == pytest.approx(0.3)


def test_ece_equal_width_by_hand() -> None:
    # Four bins (0, .25], (.25, .5], (.5, .75], (.75, 1]. Confidence 0.5 (hit) sits on an edge and goes to
    # (.25, .5]: gap 0.5, weight 1/4. 0.6 (miss) and 0.7 (hit) share (.5, .75]: acc 0.5, conf 0.65, gap 0.15,
    # weight 2/4. 1.0 (hit): gap 0. ECE = 0.125 + 0.075 = 0.2 (putting 0.5 in the third bin would give 0.05).
    probs = _t([[0.5, 0.3, 0.2], [0.6, 0.4, 0.0], [0.7, 0.3, 0.0], [1.0, 0.0, 0.0]])
    assert ece_equal_width(probs, _y([0, 1, 0, 0]), bins=4) == pytest.approx(0.2)


def test_perfectly_calibrated_predictions_have_zero_ece() -> None:
    # Four points at confidence 0.5 with 2 hits and four at 0.75 with 3 hits: each bin's accuracy equals its
    # confidence, both for two equal-mass bins and for 15 (or 4) equal-width bins.
    probs = _t([[0.5, 0.3, 0.2]] * 4 + [[0.75, 0.25, 0.0]] * 4)
    targets = _y([0, 0, 1, 2, 0, 0, 0, 1])
    assert ece_equal_mass(probs, targets, bins=2) == pytest.approx(0.0, abs=1e-12)
    assert ece_equal_width(probs, targets) == pytest.approx(0.0, abs=1e-12)
    assert ece_equal_width(probs, targets, bins=4) == pytest.approx(0.0, abs=1e-12)


def test_accumulator_in_chunks_matches_summarize() -> None:
    g = torch.Generator().manual_seed(0)
    s, n, c = 3, 10, 4
    log_probs = torch.randn(s, n, c, generator=g).mul(3).log_softmax(-1).float()
    targets = torch.randint(0, c, (n,), generator=g)
    acc = PredictionAccumulator(targets, num_samples=s, num_classes=c)
    # Chunks of uneven size, with samples interleaved, as an evaluation loop over batches would feed them.
    for start, stop in [(0, 4), (4, 7), (7, 10)]:
        for i in reversed(range(s)):
            acc.add(i, start, log_probs[i, start:stop])
    got, want = acc.result(), summarize(log_probs, targets)
    assert set(got) == KEYS
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_accumulator_rejects_double_and_missing_adds() -> None:
    acc = PredictionAccumulator(_y([0, 1]), num_samples=2, num_classes=2)
    acc.add(0, 0, torch.zeros(2, 2).log_softmax(-1))
    with pytest.raises(PyrozooError):
        acc.add(0, 1, torch.zeros(1, 2).log_softmax(-1))
    with pytest.raises(PyrozooError):
        acc.result()


def test_single_sample_nll_is_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, 5, (7,), generator=g)
    ce = F.cross_entropy(logits, targets).item()
    result = summarize(logits.log_softmax(-1)[None], targets)
    assert result["nll"] == pytest.approx(ce, rel=1e-12)
    # With one sample the mixture and the joint coincide: LPD = -NLL.
    assert result["lpd"] == pytest.approx(-ce, rel=1e-12)


@st.composite
def predictions(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    s, n, c = draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(2, 5))
    logits = draw(st.lists(st.floats(-10, 10), min_size=s * n * c, max_size=s * n * c))
    targets = draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    log_probs = torch.tensor(logits, dtype=torch.float64).reshape(s, n, c).log_softmax(-1)
    return log_probs, _y(targets), draw(st.permutations(range(s)))


@settings(max_examples=60, deadline=None)
@given(predictions())
def test_metric_ranges_and_jensen_bounds(case: tuple[torch.Tensor, torch.Tensor, list[int]]) -> None:
    log_probs, targets, _ = case
    s, n, _ = log_probs.shape
    r = summarize(log_probs, targets)
    assert 0 <= r["ece"] <= 1 and 0 <= r["ece15"] <= 1
    assert 0 <= r["brier"] <= 2 and 0 <= r["accuracy"] <= 1
    assert r["nll"] >= -1e-12 and r["lpd"] <= 1e-12
    ll = log_probs.gather(2, targets[None, :, None].expand(s, n, 1)).squeeze(2)
    # Jensen (log of a mean >= mean of logs), per point and per joint: both beat the average sample.
    assert -r["nll"] >= ll.mean().item() - 1e-9
    assert r["lpd"] >= ll.mean().item() - 1e-9
    # prod_n mean_s p >= S^(1-N) mean_s prod_n p (the diagonal terms of the expanded product), so
    # LPD <= -NLL + ln S * (N - 1) / N; with one point (or one sample) they are equal. There is no lower bound
    # on LPD in terms of NLL: see test_nll_and_lpd_by_hand_and_they_differ.
    assert r["lpd"] <= -r["nll"] + math.log(s) * (n - 1) / n + 1e-9
    if n == 1 or s == 1:
        assert r["lpd"] == pytest.approx(-r["nll"], abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(predictions())
def test_sample_order_does_not_matter(case: tuple[torch.Tensor, torch.Tensor, list[int]]) -> None:
    log_probs, targets, perm = case
    a, b = summarize(log_probs, targets), summarize(log_probs[perm], targets)
    assert b["nll"] == pytest.approx(a["nll"], rel=1e-12, abs=1e-12)
    assert b["lpd"] == pytest.approx(a["lpd"], rel=1e-12, abs=1e-12)
    # Summing in another order can flip an argmax only where two classes tie up to rounding.
    top2 = log_probs.exp().mean(0).topk(2, dim=1).values
    near_ties = int((top2[:, 0] - top2[:, 1] < 1e-12).sum())
    assert abs(b["accuracy"] - a["accuracy"]) <= near_ties / len(targets)


def test_a_group_of_draws_gives_the_metrics_of_its_draws_one_by_one():
    """A draw may map a batch to [K, B, C], K samples at once: the metrics are those of the K draws given
    one at a time, to the last bit (each point receives its samples in the same order)."""
    g = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(5, 23, 4, generator=g, dtype=torch.float64), dim=-1)
    targets = torch.randint(0, 4, (23,), generator=g)
    groups = [lambda idx: log_probs[:2, idx], lambda idx: log_probs[2, idx], lambda idx: log_probs[3:, idx]]
    grouped = evaluate_draws(groups, torch.arange(23), targets, 4, 5, batch_size=7)
    assert grouped == summarize(log_probs, targets)
    with pytest.raises(PyrozooError, match="never added"):  # a group counts all its samples, not one
        evaluate_draws(groups[:2], torch.arange(23), targets, 4, 5, batch_size=7)


def test_net_metrics_builds_no_autograd_graph():
    """A regressor's test metrics are computed without gradients (the decorator once slid onto a neighbour)."""
    from types import SimpleNamespace

    from pyrozoo.metrics import net_metrics
    from pyrozoo.models.likelihoods import Gaussian

    net, seen = torch.nn.Linear(3, 1), []
    net.register_forward_hook(lambda module, inputs, out: seen.append(out.requires_grad))
    data = SimpleNamespace(
        task="regress", x_test=torch.randn(10, 3), y_test=torch.randn(10), y_mean=0.0, y_std=1.0
    )
    net_metrics(net, data, Gaussian("fixed", 1.0))
    assert seen == [False]
