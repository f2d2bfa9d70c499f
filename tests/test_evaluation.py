"""Tests for pyrozoo.evaluation: drawing posterior samples together or one at a time gives the same metrics.
(That evaluating never changes training is in test_train.py, with the runs it trains.)"""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("net", ["tiny_mlp_model", "tiny_lenet_model"])
@pytest.mark.parametrize("at_once", [2, 5])
def test_evaluating_samples_together_gives_the_metrics_of_the_one_at_a_time_loop(net, at_once, request):
    """The same seed gives the same draws whether they go through the net one at a time or several together
    (vmap over the stacked weights), and so the same metrics; a different seed gives other metrics, so the
    comparison can fail."""
    from pyrozoo.evaluation import evaluate
    from pyrozoo.guides import make_guide

    model = request.getfixturevalue(net)
    side = 32 if net == "tiny_lenet_model" else 4
    classes = 10 if net == "tiny_lenet_model" else 3
    x, y = torch.randn(9, 1, side, side), torch.randint(0, classes, (9,))
    guide = make_guide("meanfield", model)
    results = []
    for seed, group in [(1, 1), (1, at_once), (2, 1)]:
        torch.manual_seed(seed)
        results.append(evaluate(model, guide, x, y, classes, 5, batch_size=8, samples_at_once=group))
    one_by_one, together, other_seed = results
    for key in one_by_one:
        assert together[key] == pytest.approx(one_by_one[key], abs=1e-6, rel=1e-6), key
    assert any(other_seed[key] != pytest.approx(one_by_one[key], abs=1e-6) for key in one_by_one)
