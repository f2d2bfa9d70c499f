"""End-to-end runs on the bundled Fashion-MNIST subset: minutes, so marked slow (``python -m pytest -m slow``)."""

import pytest
import torch

from pyrozoo.bmr import rebuild
from pyrozoo.config import TrainConfig
from pyrozoo.train import Run


@pytest.mark.slow
def test_stochastic_bmr_prunes_and_the_rebuilt_net_agrees(tmp_path):
    config = TrainConfig(net="lenet", data="fashion-mnist-mini", method="bmr-ss", epochs=8, samples=20)
    config.steps_per_epoch = config.warmup_steps = 200
    run = Run(config, tmp_path, log=lambda text: None)
    metrics = run.train(progress=False)
    assert metrics["pruned_fraction"].is_monotonic_increasing and metrics["pruned_fraction"].iloc[-1] > 0.05
    assert metrics["accuracy"].iloc[-1] > 0.75
    net = rebuild(run.model, run.guide)
    x = run.data.x_test[:64]
    with torch.no_grad():
        expected = run.model.logits(x, run.model.weights_from(run.guide.mean()))
        torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-4)
