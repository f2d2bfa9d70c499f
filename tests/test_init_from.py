"""Starting a posterior from trained weights (``--init-from``, pyrozoo.init_from): the net's outputs at the
posterior mean are the trained net's, for the flat and tiered priors and every guide; the first evaluation is the
trained net's accuracy; files that do not fit are one-line errors."""

from __future__ import annotations

import copy

import pytest
import torch
from configs import tiny_config

from pyrozoo.bmr.rebuild import rebuild
from pyrozoo.config import TrainConfig
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import GUIDES, make_guide
from pyrozoo.init_from import fit_hyperparameters, start_from_weights
from pyrozoo.metrics import evaluate_net
from pyrozoo.models import BayesianModel
from pyrozoo.models.priors import flat, tiered
from pyrozoo.nets import create_net
from pyrozoo.posteriors.laplace import start_curvature
from pyrozoo.train import Run


def _trained_mlp(seed: int = 3):
    """An MLP whose weights look trained: far from any guide's initialisation, different scales per layer."""
    torch.manual_seed(seed)
    net = create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(5, 4))
    with torch.no_grad():
        for i, p in enumerate(net.parameters()):
            p.copy_(torch.randn(p.shape) * (0.3 + i))
    return net


@pytest.mark.parametrize("prior", [flat, tiered], ids=["flat", "tiered"])
@pytest.mark.parametrize("kind", [k for k in GUIDES if not GUIDES[k].fixed_prior])
def test_outputs_at_the_posterior_mean_are_the_trained_nets(prior, kind):
    trained = _trained_mlp()
    model = BayesianModel(create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(5, 4)), prior)
    guide = make_guide(kind, model)
    x = torch.randn(7, 1, 4, 4)
    assert not torch.allclose(rebuild(model, guide, remove_dead=False)(x), trained(x), atol=1e-2)  # can fail
    start_from_weights(model, guide, trained)
    torch.testing.assert_close(rebuild(model, guide, remove_dead=False)(x), trained(x), rtol=1e-5, atol=1e-5)
    for site, (_, scale) in guide.posterior().items():  # scales start small
        assert bool((scale <= 1.001e-3).all()), site


def test_hyperparameters_fit_the_weights_scale():
    """The flat prior's precision is fitted to the weights: the layer scale is near their RMS (the maximum of
    N(w; 0, c^2) with a Gamma(2, 2) prior on c^-2 is close to it for many weights), not the guide's random draw.
    """
    model = BayesianModel(create_net("mlp", in_channels=1, image_size=16, num_classes=3, hidden=(200,)), flat)
    guide = make_guide("meanfield", model)
    weights = {layer.name: torch.randn(layer.shape) * 0.02 for layer in model.layers}
    hyper = fit_hyperparameters(model, guide, weights, steps=600)
    hidden = model.layers[0]
    precision = hyper[f"{hidden.name}.precision"].exp()
    scale = 0.1 * precision.rsqrt()
    assert float(scale) == pytest.approx(0.02, rel=0.05)


def test_first_evaluation_is_the_trained_nets_accuracy(tmp_path):
    # scales start small (the Laplace start of a net trained 2 steps on 600 images is near the prior's)
    config = dict(epochs=1, steps_per_epoch=2, samples=20, net_options={"hidden": (16, 16)})
    small = {"guide_options": {"init_scale": 1e-3}}
    source = Run(tiny_config(method="flat-map", **config, lr=1e-2), tmp_path / "map", log=print)
    source.train(progress=False)
    net = rebuild(source.model, source.guide, remove_dead=False)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    d = source.data
    accuracy = evaluate_net(net, d.x_test, d.y_test, d.num_classes)["accuracy"]
    for method in ("bmr-th", "tiered-ff"):
        run = Run(
            tiny_config(method=method, init_from=str(tmp_path / "net.pt"), **config, **small),
            tmp_path / method,
        )
        assert run.evaluate()["accuracy"] == pytest.approx(accuracy, abs=0.01)
        fresh = Run(tiny_config(method=method, **config), tmp_path / f"{method}-fresh")
        assert abs(fresh.evaluate()["accuracy"] - accuracy) > 0.05  # the test could fail
    # flat-map's net has dropout layers, which shift nn.Sequential's names: the same tensors under other names
    assert set(net.state_dict()) != set(run.model.net.state_dict())
    whole = tmp_path / "whole.pt"
    torch.save(net, whole)  # a net saved whole, as pyrozoo export's sparse_net.pt
    run = Run(
        tiny_config(method="flat-ff", init_from=str(whole), trust_pickle=True, **config, **small),
        tmp_path / "whole",
    )
    assert run.evaluate()["accuracy"] == pytest.approx(accuracy, abs=0.01)


def test_files_that_do_not_fit_are_one_line_errors(tmp_path):
    config = dict(
        net="mlp",
        data="fashion-mnist-mini",
        epochs=1,
        steps_per_epoch=1,
        batch_size=8,
        net_options={"hidden": (5,)},
    )
    other = create_net("mlp", in_channels=1, image_size=28, num_classes=10, hidden=(7,))
    torch.save(other.state_dict(), tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    torch.save({"a": 1}, tmp_path / "dict.pt")
    cases = {
        "other.pt": "has shape",
        "junk.pt": "not a file of weights saved by torch.save .*sparse_state_dict.pt",
        "dict.pt": "neither a state_dict .*pyrozoo export RUN --pruned none",
        "missing.pt": "no such file",
        ".": "a folder, not a file of weights",
    }
    for name, message in cases.items():
        with pytest.raises(PyrozooError, match=message) as e:
            Run(TrainConfig(**config, init_from=str(tmp_path / name)), tmp_path / name.replace(".", "-"))
        assert "\n" not in str(e.value)
        assert not (tmp_path / name.replace(".", "-")).exists()  # no folder left behind
    state = create_net("mlp", in_channels=1, image_size=28, num_classes=10, hidden=(5,)).state_dict()
    renamed = {f"x.{k}": v for k, v in list(state.items())[:-1]}  # other names, and one tensor short
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(PyrozooError, match="missing"):
        Run(TrainConfig(**config, init_from=str(tmp_path / "renamed.pt")), tmp_path / "renamed")


def test_a_net_whose_modules_check_their_state_version_starts_from_its_weights():
    """MNASNet refuses a state without module versions (torch keeps them in the state_dict's metadata)."""
    from torch import nn

    class Versioned(nn.Linear):
        _version = 2

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
            if local_metadata.get("version") != 2:
                raise ValueError("version should be set to 2")
            super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    net = nn.Sequential(Versioned(4, 6), nn.ReLU(), nn.Linear(6, 3))
    model = BayesianModel(net, example_input=torch.randn(2, 4))
    guide = make_guide("meanfield", model)
    start_from_weights(model, guide, net, steps=0)
    x = torch.randn(5, 4)
    with torch.no_grad():
        torch.testing.assert_close(model.logits(x, model.weights_from(guide.mean())), net(x))


def test_laplace_start_is_the_diagonal_laplace_scale_of_an_exact_ggn():
    """init_scale="laplace": each latent starts at (1 + scale^2 H)^-1/2, H the GGN diagonal summed over the data,
    here against a softmax regression's exact one, sum_n p_i (1 - p_i) [x_n, 1]_j^2 (its Monte Carlo estimate
    from START_FIT_SIZE of 6,000 inputs, scaled up: within 15%)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    model = BayesianModel(net, flat)
    guide = make_guide("meanfield", model)
    trained = copy.deepcopy(net)
    with torch.no_grad():
        for p in trained.parameters():
            p.copy_(torch.randn(p.shape))
    x = torch.randn(6000, 1, 2, 2)
    start_from_weights(
        model,
        guide,
        trained,
        init_scale="laplace",
        curvature=lambda net: start_curvature(model, guide, net, x),
    )
    layer = model.layers[0]
    p = trained(x).softmax(-1).double()
    a = torch.cat([x.flatten(1), torch.ones(len(x), 1)], 1).double()
    exact = (p * (1 - p)).T @ a.square()
    scale = float(guide.mean()[f"{layer.name}.precision"].rsqrt())  # the flat prior's, on an output layer
    got = guide.posterior()[layer.site][1].double()
    torch.testing.assert_close(got, (1 + scale**2 * exact).rsqrt(), rtol=0.15, atol=0)
    assert float(got.max()) < 0.5  # the data pin these weights: far below the prior's 1, far above 1e-3


def test_a_given_init_scale_wins_over_the_laplace_start(tmp_path):
    config = dict(epochs=1, steps_per_epoch=1, net_options={"hidden": (8,)})
    source = Run(tiny_config(method="flat-map", **config), tmp_path / "map")
    torch.save(rebuild(source.model, source.guide, remove_dead=False).state_dict(), tmp_path / "net.pt")
    for options, small in (({"init_scale": 2e-3}, True), ({}, False)):
        config_ = tiny_config(
            method="bmr-th", init_from=str(tmp_path / "net.pt"), guide_options=options, **config
        )
        run = Run(config_, tmp_path / f"bmr-th-{small}")
        scales = torch.cat([s.flatten() for _, s in run.guide.posterior().values()])
        assert bool((scales <= 2.001e-3).all()) == small


@pytest.mark.parametrize("guide", ["autodelta", "meanfield"])
def test_a_regressions_noise_precision_starts_at_its_priors_mode_not_off_to_infinity(guide):
    """The noise precision is a likelihood latent, not a prior's: fitted by its Gamma(2, 2) prior with the
    log-Jacobian of exp, its optimum is 1 (by the Jacobian alone it grew without bound: 1.6e6 on toy1d)."""
    from test_regression import regression_model

    model = regression_model()
    posterior = make_guide(guide, model)
    weights = {layer.name: layer.join(model.net) for layer in model.layers}
    hyper = fit_hyperparameters(model, posterior, weights, steps=600)
    assert abs(float(hyper["noise.precision"].exp()) - 1.0) < 0.05
