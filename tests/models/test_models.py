import math

import pyro
import pytest
import torch
import torch.distributions as td
from hypothesis import given, settings
from hypothesis import strategies as st
from pyro import poutine
from torch import nn

from pyrozoo.errors import PyrozooError
from pyrozoo.models import BayesianModel, find_layers
from pyrozoo.models.bayesian import StandardNormal


def test_one_latent_per_layer_with_bias_column(tiny_lenet_model):
    layers = tiny_lenet_model.layers
    assert [layer.name for layer in layers] == [
        "features.0",
        "features.3",
        "features.6",
        "classifier.0",
        "head",
    ]
    assert [tuple(layer.shape) for layer in layers] == [(2, 26), (3, 51), (4, 76), (5, 5), (10, 6)]
    assert [layer.is_output for layer in layers] == [False] * 4 + [True]
    trace = poutine.trace(tiny_lenet_model.sample_weights).get_trace()
    for layer in layers:
        assert trace.nodes[layer.site]["value"].shape == layer.shape
        assert trace.nodes[f"{layer.name}.precision"]["value"].shape == ()


def test_split_and_join_are_inverse(tiny_lenet_model):
    for layer in tiny_lenet_model.layers:
        module = tiny_lenet_model.net.get_submodule(layer.name)
        w = layer.join(tiny_lenet_model.net)
        params = layer.split(w)
        assert torch.equal(params[f"{layer.name}.weight"], module.weight)
        assert torch.equal(params[f"{layer.name}.bias"], module.bias)


def test_split_gives_the_gradient_of_slicing(tiny_lenet_model):
    """split's one torch.split (its backward a concatenation) gives the latent the gradient two slices give,
    bit for bit."""
    for layer in tiny_lenet_model.layers:
        w = layer.join(tiny_lenet_model.net).requires_grad_()
        params = layer.split(w)
        up = {name: torch.randn(p.shape) for name, p in params.items()}
        sum((p * up[name]).sum() for name, p in params.items()).backward()
        sliced = w.detach().clone().requires_grad_()
        weight, bias = sliced[:, : layer.fan_in].reshape(layer.weight_shape), sliced[:, layer.fan_in]
        ((weight * up[f"{layer.name}.weight"]).sum() + (bias * up[f"{layer.name}.bias"]).sum()).backward()
        assert torch.equal(w.grad, sliced.grad)


def test_unsupported_layer_is_named_with_the_selector_that_keeps_it_deterministic():
    net = nn.Sequential(nn.Linear(3, 4), nn.PReLU(4), nn.Linear(4, 2))
    with pytest.raises(PyrozooError, match=r"'1' of type PReLU random.*deterministic=\['1'\]"):
        find_layers(net)
    assert [layer.name for layer in find_layers(net, deterministic=["1"])] == ["0", "2"]
    assert [layer.name for layer in find_layers(net, deterministic=[nn.PReLU])] == ["0", "2"]


def test_batch_norm_is_deterministic_unless_selected_random_and_selectors_go_by_type_name_or_pattern():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.Linear(4, 2))
    assert [layer.name for layer in find_layers(net)] == ["0", "2", "3"]
    assert [(l.name, l.kind) for l in find_layers(net, random=["BatchNorm1d"])][1] == ("1", "norm")
    with pytest.raises(PyrozooError, match="no random weight layers"):
        find_layers(net, deterministic=[nn.Linear])
    assert [layer.name for layer in find_layers(net, deterministic="2")] == ["0", "3"]
    assert [layer.name for layer in find_layers(net, deterministic=["[02]"])] == ["3"]
    with pytest.raises(PyrozooError, match="selector 'bn' matches no module"):
        find_layers(net, deterministic=["bn"])
    with pytest.raises(PyrozooError, match="both deterministic"):
        find_layers(net, deterministic=["2"], random=[nn.Linear])


def test_output_layer_defaults_to_last_and_can_be_named():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False))
    assert [layer.is_output for layer in find_layers(net)] == [False, True]
    assert find_layers(net)[1].shape == (2, 4)  # no bias column
    assert [layer.is_output for layer in find_layers(net, output="0")] == [True, False]
    with pytest.raises(PyrozooError):
        find_layers(net, output="1")


def test_weights_follow_the_flat_prior(tiny_mlp_model):
    trace = poutine.trace(tiny_mlp_model.sample_weights).get_trace()
    weights = trace.nodes["_RETURN"]["value"]
    for layer in tiny_mlp_model.layers:
        precision = trace.nodes[f"{layer.name}.precision"]["value"]
        z = trace.nodes[layer.site]["value"]
        c = precision**-0.5 / (1 if layer.is_output else 10)
        torch.testing.assert_close(weights[layer.name], c * z)


def test_log_density_matches_an_independent_computation(tiny_mlp_model, tiny_batch):
    x, y = tiny_batch
    dataset_size = 60
    trace = poutine.trace(tiny_mlp_model).get_trace(x, y, dataset_size)
    trace.compute_log_prob()
    pyro_total = sum(
        site["log_prob_sum"]
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and name != "data"
    )
    expected, weights = 0.0, {}
    for layer in tiny_mlp_model.layers:
        precision = trace.nodes[f"{layer.name}.precision"]["value"]
        z = trace.nodes[layer.site]["value"]
        expected += td.Gamma(2.0, 2.0).log_prob(precision)
        expected += (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum()
        weights[layer.name] = precision**-0.5 / (1 if layer.is_output else 10) * z
    # the same net written by hand: Linear layers as matrix products
    h = x.flatten(1)
    for name in ("body.1", "body.3"):
        w = weights[name]
        h = torch.nn.functional.silu(h @ w[:, :-1].T + w[:, -1])
    logits = h @ weights["head"][:, :-1].T + weights["head"][:, -1]
    expected += dataset_size / len(x) * torch.log_softmax(logits, -1).gather(1, y[:, None]).sum()
    torch.testing.assert_close(pyro_total, expected)


def test_masks_zero_weights_and_are_saved(tiny_mlp_model):
    layer = tiny_mlp_model.layers[0]
    keep = torch.rand(layer.shape) > 0.5
    tiny_mlp_model.set_mask(layer.name, keep)
    weights = tiny_mlp_model.sample_weights()
    assert torch.all(weights[layer.name][~keep] == 0) and torch.all(weights[layer.name][keep] != 0)
    clone = BayesianModel(type(tiny_mlp_model.net)(16, (5, 4), 3))
    clone.load_state_dict(tiny_mlp_model.state_dict())
    assert torch.equal(clone.mask(layer.name), keep.float())
    assert torch.all(clone.sample_weights()[layer.name][~keep] == 0)
    with pytest.raises(ValueError):
        tiny_mlp_model.set_mask(layer.name, keep[:1])


def test_logits_use_the_given_weights(tiny_lenet_model):
    x = torch.randn(3, 1, 32, 32)
    weights = tiny_lenet_model.sample_weights()
    plain = type(tiny_lenet_model.net)(1, 32, (2, 3, 4), 5, 10)
    with torch.no_grad():
        for layer in tiny_lenet_model.layers:
            for key, value in layer.split(weights[layer.name]).items():
                plain.get_parameter(key).copy_(value)
    seen = []  # the convolutions get their weights in channels-last strides on the CPU, the same values
    hooks = [
        module.register_forward_pre_hook(lambda m, _: seen.append(m.weight.stride()[1] == 1))
        for module in tiny_lenet_model.net.modules()
        if isinstance(module, nn.Conv2d)
    ]
    torch.testing.assert_close(tiny_lenet_model.logits(x, weights), plain(x))
    for hook in hooks:
        hook.remove()
    assert seen == [True] * 3


def test_minibatch_likelihood_is_scaled_to_the_dataset(tiny_mlp_model, tiny_batch):
    x, y = tiny_batch
    trace = poutine.trace(tiny_mlp_model).get_trace(x, y, 600)
    assert trace.nodes["y"]["scale"] == 100.0


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-30, 30), min_size=1, max_size=5),
    st.lists(st.floats(1e-4, 1e3), min_size=1, max_size=5),
)
def test_standard_normal_kl_equals_the_general_formula(locs, scales):
    n = min(len(locs), len(scales))
    loc = torch.tensor(locs[:n], dtype=torch.float64)
    scale = torch.tensor(scales[:n], dtype=torch.float64)
    fast = td.kl_divergence(
        pyro.distributions.Normal(loc, scale), StandardNormal(loc.shape, dtype=torch.float64)
    )
    general = td.kl_divergence(td.Normal(loc, scale), td.Normal(torch.zeros_like(loc), torch.ones_like(loc)))
    torch.testing.assert_close(fast, general)


def test_flat_hidden_scale_is_a_prior_option():
    import functools

    from pyrozoo.models.priors import flat
    from pyrozoo.nets import create_net

    net = create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(5,))
    model = BayesianModel(net, prior=functools.partial(flat, hidden_scale=1.0))
    trace = poutine.trace(model.sample_weights).get_trace()
    for layer in model.layers:  # hidden and output layers now share the scale c = precision^-1/2
        c = trace.nodes[f"{layer.name}.precision"]["value"] ** -0.5
        torch.testing.assert_close(
            trace.nodes["_RETURN"]["value"][layer.name], c * trace.nodes[layer.site]["value"]
        )
