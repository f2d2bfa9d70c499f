import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrozoo.bmr import make_reduction
from pyrozoo.bmr.rules import SpikeAndSlab, Threshold
from pyrozoo.errors import PyrozooError
from pyrozoo.methods import METHODS


def threshold(df, live, margin=0.0):
    return Threshold(margin).decide(df, live)


def spike_and_slab(df, live, **options):
    """The spike-and-slab rule with sums over the live weights only (pyrozoo's rule before 2026-11-30)."""
    return SpikeAndSlab(**{"pruned_vote": False, **options}).decide(df, live)


def reference_spike_and_slab(df, live):
    """bmr-ss's rule as the reference code runs it: every entry votes with its own dF, pruned ones too."""
    return METHODS["bmr-ss"].reduction.decide(df, live)


def layer_spike_and_slab(df, live):
    """The configured spike-and-slab that the method bmr-lss runs."""
    return METHODS["bmr-lss"].reduction.decide(df, live)


def test_threshold_prunes_iff_evidence_rises():
    df = torch.tensor([-3.0, -0.1, 0.0, 0.1, 5.0])
    live = torch.ones(5, dtype=torch.bool)
    assert threshold(df, live).keep.tolist() == [True, True, True, False, False]
    assert threshold(df, live, margin=-0.5).keep.tolist() == [True, False, False, False, False]


def test_spike_and_slab_all_prunable():
    df = torch.full((1000,), 3.0)
    decision = spike_and_slab(df, torch.ones(1000, dtype=torch.bool))
    assert not decision.keep.any() and decision.inclusion < 0.01 and decision.cutoff < -3


def test_spike_and_slab_none_prunable():
    df = torch.full((1000,), -3.0)
    decision = spike_and_slab(df, torch.ones(1000, dtype=torch.bool))
    assert decision.keep.all() and decision.inclusion > 0.99 and decision.cutoff > 3


def test_spike_and_slab_mixed_matches_a_hand_iteration():
    df = torch.cat([torch.full((90,), 2.0), torch.full((10,), -8.0), torch.tensor([-1.0, -2.5])])
    decision = spike_and_slab(df, torch.ones(len(df), dtype=torch.bool))
    zeta = _zeta(df.tolist())  # docs/method.md#spike-and-slab, written out with the standard library
    assert decision.cutoff == pytest.approx(zeta)
    assert decision.keep.tolist() == [d <= zeta for d in df.tolist()]
    # mostly prunable layer: the cutoff drops below 0, so a weight with dF = -1 goes too
    assert zeta < -1 and not decision.keep[-2] and decision.keep[90:100].all()


def _zeta(df: list[float], iterations: int = 4) -> float:
    """The cut-off of docs/method.md#spike-and-slab, written out with the standard library."""
    zeta = 0.0
    for _ in range(iterations):
        q = [0.5 * (1 + math.tanh((zeta - d) / 2)) for d in df]  # sigmoid, without overflow
        zeta = digamma(1 + sum(q)) - digamma(1 + sum(1 - v for v in q))
    return zeta


def digamma(x: float) -> float:
    return torch.digamma(torch.tensor(x, dtype=torch.float64)).item()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=60), st.integers(0, 2**32 - 1))
def test_rules_keep_the_live_weights_at_or_below_an_independently_computed_cutoff(values, seed):
    df = torch.tensor(values)
    live = torch.rand(len(values), generator=torch.Generator().manual_seed(seed)) > 0.3
    live_values = [v for v, alive in zip(values, live.tolist()) if alive]
    pruned_as_excluded = live_values + [1e9] * int((~live).sum())  # q = 0 for a pruned weight
    expected = {
        "threshold": 0.0,
        "spike-and-slab, live only": _zeta(live_values),
        "bmr-ss": _zeta(values),
        "bmr-lss": min(_zeta(pruned_as_excluded), 0.0),
    }
    decisions = {
        "threshold": threshold(df, live),
        "spike-and-slab, live only": spike_and_slab(df, live),
        "bmr-ss": reference_spike_and_slab(df, live),
        "bmr-lss": layer_spike_and_slab(df, live),
    }
    for name, decision in decisions.items():
        assert decision.cutoff == pytest.approx(expected[name], abs=1e-5), name
        want = [alive and v <= expected[name] + 1e-6 for v, alive in zip(values, live.tolist())]
        near = [abs(v - expected[name]) < 1e-5 for v in values]  # float32 rounding at the cut-off itself
        assert all(k == w or n for k, w, n in zip(decision.keep.tolist(), want, near)), name


def test_pruned_weights_do_not_vote():
    """The inclusion estimate uses live weights only: dead weights' dF must not move the cutoff."""
    df = torch.cat([torch.full((50,), -4.0), torch.full((50,), 4.0)])
    live = torch.cat([torch.ones(50, dtype=torch.bool), torch.zeros(50, dtype=torch.bool)])
    assert spike_and_slab(df, live).cutoff == pytest.approx(spike_and_slab(df[:50], live[:50]).cutoff)


def test_in_the_reference_rule_pruned_weights_vote_with_their_own_evidence():
    """As the reference code runs it, a pruned entry's dF counts as a live one's would: a layer whose pruned
    half now looks indifferent (dF near 0, drifted to the prior) has a higher cut-off than its live half alone.
    """
    df = torch.cat([torch.full((50,), -4.0), torch.full((50,), 0.0)])
    live = torch.cat([torch.ones(50, dtype=torch.bool), torch.zeros(50, dtype=torch.bool)])
    everyone = reference_spike_and_slab(df, live)
    assert everyone.cutoff == pytest.approx(
        reference_spike_and_slab(df, torch.ones(100, dtype=torch.bool)).cutoff
    )
    assert everyone.cutoff != pytest.approx(spike_and_slab(df, live).cutoff)
    assert not everyone.keep[50:].any()  # pruned entries stay pruned whatever they say


def test_unknown_rule():
    with pytest.raises(PyrozooError, match="known reductions: threshold"):
        make_reduction("magnitude")


def test_counting_pruned_weights_lowers_the_cutoff():
    """With pruned weights counted as excluded, a layer that is mostly pruned keeps pruning hard: the cutoff
    falls below the dF of indifferent survivors and, here, even of clearly useful ones."""
    df = torch.cat([torch.full((10,), -5.0), torch.full((40,), 0.1), torch.zeros(950)])
    live = torch.cat([torch.ones(50, dtype=torch.bool), torch.zeros(950, dtype=torch.bool)])
    survivors = spike_and_slab(df, live)
    layer = spike_and_slab(df, live, count_pruned=True)
    assert survivors.cutoff > 0.1 and survivors.keep[:50].all()  # the live majority looks worth keeping
    assert layer.cutoff < -5 and not layer.keep.any()
    assert layer.inclusion < 0.05 < survivors.inclusion


def test_layer_rule_on_a_mostly_live_layer_is_the_threshold_rule():
    """Most of the layer looks needed, so the layer-wide cut-off is positive; the cap at 0 still removes the
    weights whose removal raises the evidence, which the plain rule keeps."""
    df = torch.cat([torch.full((80,), -6.0), torch.tensor([0.3, 0.8, -0.2, 0.0])])
    live = torch.ones(len(df), dtype=torch.bool)
    assert spike_and_slab(df, live).cutoff > 0.8 and spike_and_slab(df, live).keep.all()
    decision = layer_spike_and_slab(df, live)
    assert decision.cutoff == 0.0
    assert decision.keep.tolist() == threshold(df, live).keep.tolist()


def test_layer_rule_on_a_mostly_pruned_layer_is_the_layer_wide_spike_and_slab():
    df = torch.cat([torch.full((10,), -5.0), torch.full((40,), -0.1), torch.zeros(950)])
    live = torch.cat([torch.ones(50, dtype=torch.bool), torch.zeros(950, dtype=torch.bool)])
    decision = layer_spike_and_slab(df, live)
    layer = spike_and_slab(df, live, count_pruned=True)
    assert decision.cutoff == pytest.approx(layer.cutoff) and decision.cutoff < -0.1
    assert decision.keep.tolist() == layer.keep.tolist()
    # every survivor has dF <= 0, so the threshold rule keeps them all: only the layer's odds remove them
    assert threshold(df, live).keep[:50].all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=1, max_size=80), st.integers(0, 2**32 - 1))
def test_layer_rule_keeps_what_both_of_its_parts_keep(values, seed):
    df = torch.tensor(values)
    live = torch.rand(len(values), generator=torch.Generator().manual_seed(seed)) > 0.5
    keep = layer_spike_and_slab(df, live).keep
    both = threshold(df, live).keep & spike_and_slab(df, live, count_pruned=True).keep
    assert keep.tolist() == both.tolist()
