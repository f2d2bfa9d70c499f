"""pyrozoo.predict: per-input predictions from posterior draws, their entropy and variance decompositions."""

import math

import numpy as np
import pytest
import torch
from pyro import poutine
from test_regression import regression_model

import pyrozoo
from pyrozoo.guides import make_guide
from pyrozoo.metrics import regression_metrics
from pyrozoo.nets import create_net


def test_predict_entropy_decomposition(tiny_mlp_model):
    guide = make_guide("meanfield", tiny_mlp_model, options={"init_scale": 0.5})
    x = torch.randn(30, 1, 4, 4)
    out = pyrozoo.predict(tiny_mlp_model, guide, x, samples=20, batch_size=7)
    for key in ("entropy", "expected_entropy", "mutual_information"):
        assert (out[key] >= 0).all()
    torch.testing.assert_close(out["entropy"], out["expected_entropy"] + out["mutual_information"])
    assert out["mutual_information"].max() > 1e-3  # a spread posterior disagrees with itself somewhere
    # against a brute-force recomputation from the same seeded draws, all at once
    with torch.random.fork_rng(), poutine.block():
        torch.manual_seed(0)
        probs = torch.stack(
            [
                torch.softmax(tiny_mlp_model.logits(x, tiny_mlp_model.weights_from(guide())).double(), -1)
                for _ in range(20)
            ]
        )
    mean = probs.mean(0)
    torch.testing.assert_close(out["probs"], mean)
    torch.testing.assert_close(out["entropy"], -(mean * mean.log()).sum(-1))
    torch.testing.assert_close(out["expected_entropy"], -(probs * probs.log()).sum(-1).mean(0))


def test_predict_with_a_deterministic_net_has_no_epistemic_part(tiny_mlp_model):
    net = create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(5,))
    out = pyrozoo.predict(net, None, torch.randn(9, 1, 4, 4))
    assert "mutual_information" not in out and "expected_entropy" not in out
    torch.testing.assert_close(out["probs"].sum(1), torch.ones(9, dtype=torch.float64))
    reg = create_net("mlp", in_channels=2, image_size=1, num_classes=1, hidden=(5,))
    out = pyrozoo.predict(reg, None, torch.randn(9, 2, 1, 1), task="regress", noise_std=0.5)
    assert "epistemic_std" in out and torch.all(out["epistemic_std"] == 0)
    torch.testing.assert_close(out["std"], torch.full((9,), 0.5, dtype=torch.float64))


def test_regression_predict_splits_the_variance():
    model = regression_model()
    guide = make_guide("meanfield", model, options={"init_scale": 0.3})
    out = pyrozoo.predict(model, guide, torch.randn(25, 2, 1, 1), samples=30, y_mean=1.0, y_std=2.0)
    torch.testing.assert_close(out["std"] ** 2, out["aleatoric_std"] ** 2 + out["epistemic_std"] ** 2)
    assert (out["lower95"] < out["lower90"]).all() and (out["lower90"] < out["lower50"]).all()
    assert (out["upper50"] < out["upper90"]).all() and (out["upper90"] < out["upper95"]).all()


def test_regression_predict_nll_per_input_against_the_mixture_density():
    """predict's per-input regression NLL is the posterior-predictive mixture's, in original units: checked
    against the density of the same seeded draws computed by hand, and its mean against regression_metrics."""
    from pyrozoo.predict import predict_batch

    model = regression_model()
    guide = make_guide("meanfield", model, options={"init_scale": 0.3})
    x, y = torch.randn(9, 2, 1, 1), torch.randn(9)
    out = pyrozoo.predict(model, guide, x, samples=6, y_mean=1.5, y_std=3.0, y=y, batch_size=4)
    # the same seeded draws (float32 sums differ a hair between batch sizes, hence the tolerances)
    draws = predict_batch(model, guide, x, samples=6)
    locs, var = draws["locs"].numpy(), draws["noise_var"].numpy()
    y_orig, mu, sd = 1.5 + 3.0 * y.double().numpy(), 1.5 + 3.0 * locs, 3.0 * np.sqrt(var)
    density = (np.exp(-0.5 * ((y_orig - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))).mean(0)
    np.testing.assert_allclose(out["nll"].numpy(), -np.log(density), rtol=1e-7)
    np.testing.assert_allclose(out["error"].numpy(), 1.5 + 3.0 * locs.mean(0) - y_orig, atol=1e-6)
    want = regression_metrics(draws["locs"], draws["noise_var"], y, y_mean=1.5, y_std=3.0)["nll"]
    assert out["nll"].mean().item() == pytest.approx(want, rel=1e-7)
