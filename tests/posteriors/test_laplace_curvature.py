"""The Laplace curvature (pyrozoo.posteriors.laplace.curvature) against the exact GGN, layer by layer, in float64.

The exact GGN block of a layer, ``Σ_n J_n' H_n J_n`` over the latent's ``[W | b]`` (row-major), is built here
from the Jacobians (one backward pass per input and output) and the categorical likelihood's Hessian
``diag(p) - p p'``, independently of curvlinops, which computes the KFAC factors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyrozoo.data import load, prepare
from pyrozoo.errors import PyrozooError
from pyrozoo.posteriors.laplace import curvature, laplace, prior_precision
from pyrozoo.models.layers import find_layers
from pyrozoo.models.likelihoods import Gaussian
from pyrozoo.nets import create_net

pytestmark = pytest.mark.usefixtures("float64")  # (conftest) these compare with exact forms


def _small_net():
    """A Linear layer after a strided, padded conv, a grouped conv and a depthwise conv (8x8 inputs)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, stride=2),  # 8x8 -> 4x4
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=1, groups=2),
        nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),  # depthwise
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(64, 5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).eval()


def _jacobians(net, x, name):
    """``(J (N, C, R*K), H (N, C, C))``: the net's outputs' Jacobian in the latent layout of layer ``name`` (a
    backward pass per input and output) and the categorical likelihood's Hessian, per input."""
    module = net.get_submodule(name)
    rows = []
    for xi in x:
        out = net(xi[None])[0]
        for c in range(len(out)):
            weight, bias = torch.autograd.grad(out[c], [module.weight, module.bias], retain_graph=True)
            rows.append(torch.cat([weight.reshape(len(bias), -1), bias[:, None]], 1).flatten())
    J = torch.stack(rows).reshape(len(x), -1, rows[0].numel())
    p = net(x).detach().softmax(-1)
    return J, torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def _exact_ggn(net, x, name):
    J, H = _jacobians(net, x, name)
    return torch.einsum("ncp,ncd,ndq->pq", J, H, J)


def _exact_trace(net, x, name):
    J, H = _jacobians(net, x, name)
    return float(torch.einsum("ncp,ncd,ndp->", J, H, J))


def _kron(factors):
    G, A = factors
    return torch.kron(G, A)


def test_kfac_is_the_exact_ggn_of_a_linear_layer_for_one_input():
    """For one input a Linear layer's GGN is ``Σ_c g_c g_c' ⊗ a a'``: KFAC's factorisation is exact."""
    net, x = _small_net(), torch.randn(1, 2, 8, 8)
    kron = curvature(net, find_layers(net), x, "kron", fisher="type-2", progress=False)
    for name in ("7", "9"):
        assert torch.allclose(_kron(kron[name]), _exact_ggn(net, x, name), rtol=1e-8, atol=1e-12)


def test_kfac_expand_of_a_conv_sums_g_over_positions_and_averages_a():
    """The expand factors of the strided, padded conv: ``G = Σ_{n,p,c} g g'`` (the output gradients of each
    column of the Hessian's square root), ``A = Σ_{n,p} a a' / (N P)`` (patches with a trailing 1). The old
    hand-written factors divided G by the positions P as well, a P-fold (here 16-fold) too small curvature."""
    net, x = _small_net(), torch.randn(3, 2, 8, 8)
    G, A = curvature(net, find_layers(net), x, "kron", fisher="type-2", progress=False)["0"]
    conv = net[0]
    out = conv(x).detach().requires_grad_()
    rest = nn.Sequential(*list(net)[1:])
    logits = rest(out)
    p = logits.detach().softmax(-1)
    roots = torch.diag_embed(p.sqrt()) - p[:, :, None] * p.sqrt()[:, None, :]  # S S' = diag(p) - p p'
    g = torch.stack(
        [torch.autograd.grad((logits * roots[:, :, c]).sum(), out, retain_graph=True)[0] for c in range(3)]
    )  # (C, N, R, 4, 4)
    g = g.flatten(3).transpose(2, 3).reshape(-1, 4)
    a = nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 18)
    a = torch.cat([a, torch.ones(len(a), 1)], 1)
    assert torch.allclose(G, g.T @ g, rtol=1e-8)
    assert torch.allclose(A, a.T @ a / len(a), rtol=1e-8)


def test_kfac_reduce_is_the_exact_ggn_of_a_conv_whose_patches_are_equal():
    """A constant image without padding gives every position the same patch ``a``; then the GGN of one input is
    ``Σ_c (Σ_p g_cp)(Σ_p g_cp)' ⊗ a a'``, which is KFAC-reduce exactly (Eschenhagen et al. 2023)."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).eval()
    x = torch.ones(1, 2, 5, 5) * torch.tensor([0.5, -1.5])[:, None, None]
    kron = curvature(net, find_layers(net), x, "kron", fisher="type-2", kfac="reduce", progress=False)
    assert torch.allclose(_kron(kron["0"]), _exact_ggn(net, x, "0"), rtol=1e-8, atol=1e-12)


def test_kfac_expand_trace_against_the_exact_ggn():
    """The size (trace) of each layer's KFAC-expand block against the exact GGN's on a batch: the Linear layers
    within 1%; the convolutions' expand factorisation drops the cross-position terms of the GGN (their
    correlation), so their trace is not the GGN's; it is of its order, not P-fold (16) too small."""
    net, x = _small_net(), torch.randn(6, 2, 8, 8)
    kron = curvature(net, find_layers(net), x, "kron", fisher="type-2", progress=False)
    for name in ("7", "9"):
        assert float(_kron(kron[name]).trace()) == pytest.approx(_exact_trace(net, x, name), rel=0.01)
    for name in ("0", "2", "4"):
        G, A = kron[name]
        assert 0.5 < float(G.trace() * A.trace()) / _exact_trace(net, x, name) < 2


def test_diagonal_is_the_exact_ggn_diagonal_of_every_layer_type():
    """The diagonal (hand-written: squared per-example gradients) against the exact GGN's diagonal, on the
    Linear, strided and padded, grouped and depthwise layers."""
    net, x = _small_net(), torch.randn(5, 2, 8, 8)
    diag = curvature(net, find_layers(net), x, "diag", fisher="type-2", batch_size=3, progress=False)
    for layer in find_layers(net):
        want = torch.diagonal(_exact_ggn(net, x, layer.name)).reshape(layer.shape)
        assert torch.allclose(diag[layer.name], want, rtol=1e-8, atol=1e-14), layer.name


def test_diagonal_of_a_float32_net_matches_its_float64_fit():
    """A float32 net's diagonal is summed per batch in float32 (the float64 patches cost as much as the
    product): it is float64 and within 1e-5 of the same net's in float64, batch sums added in float64."""
    net, x = _small_net(), torch.randn(40, 2, 8, 8)
    exact = curvature(net, find_layers(net), x, "diag", fisher="type-2", batch_size=16, progress=False)
    layers = find_layers(net)
    fast = curvature(net.float(), layers, x.float(), "diag", fisher="type-2", batch_size=16, progress=False)
    for layer in layers:
        assert fast[layer.name].dtype == torch.float64
        assert torch.allclose(fast[layer.name], exact[layer.name], rtol=1e-5, atol=1e-7), layer.name


def test_monte_carlo_curvature_approaches_the_exact_ggn():
    """The default Monte Carlo Fisher (sampled labels) is unbiased for the exact GGN: with many samples the
    diagonal and the KFAC factors' product come within 10% of the type-2 ones (2-5% measured at 100 samples).
    """
    net, x = _small_net(), torch.randn(4, 2, 8, 8)
    layers = find_layers(net)
    for structure in ("diag", "kron"):
        exact = curvature(net, layers, x, structure, fisher="type-2", progress=False)
        mc = curvature(net, layers, x, structure, samples=100, progress=False)
        for name in ("0", "2", "4", "7", "9"):
            want = _kron(exact[name]) if structure == "kron" else exact[name]
            got = _kron(mc[name]) if structure == "kron" else mc[name]
            assert float((got - want).norm() / want.norm()) < 0.1, (structure, name)


def test_ekfac_trace_is_the_exact_ggn_trace():
    """EKFAC's eigenvalues are the GGN's second moments in the Kronecker eigenbasis, so their sum is the exact
    GGN block's trace on every layer whose patches curvlinops takes as they are (not the grouped convs, whose
    input channels it averages over the groups)."""
    net, x = _small_net(), torch.randn(6, 2, 8, 8)
    kron = curvature(net, find_layers(net), x, "kron", fisher="type-2", ekfac=True, progress=False)
    for name in ("0", "7", "9"):
        G, A, (u_g, u_a, eigenvalues) = kron[name]
        assert float(eigenvalues.sum()) == pytest.approx(_exact_trace(net, x, name), rel=1e-8)
        assert torch.allclose(u_g @ torch.diag(torch.diagonal(u_g.T @ G @ u_g)) @ u_g.T, G, atol=1e-10)


def test_lenet_conv_curvature_is_the_size_of_the_exact_ggn():
    """The paper's LeNet on 8 Fashion-MNIST images: every conv layer's EKFAC block has the exact GGN block's
    trace (within 10%; exactly, up to round-off). KFAC-expand's own eigenvalues ``g_i a_j`` drop the
    cross-position terms, strongly correlated on images (a constant background): on these images its trace is
    0.09x the GGN's for conv1, 0.30x for conv2 and 1.0x for conv3 (one output position), not 1/784 and 1/100 of it
    as the hand-written factors before curvlinops gave."""
    data = prepare(load("fashion-mnist-mini"), pad_to=32)
    torch.manual_seed(0)
    net = create_net("lenet", in_channels=1, image_size=32, num_classes=10).double().eval()
    x = data.x_train[:8].double()
    convs = [layer for layer in find_layers(net) if isinstance(net.get_submodule(layer.name), nn.Conv2d)]
    assert len(convs) == 3
    kron = curvature(net, convs, x, "kron", fisher="type-2", ekfac=True, progress=False)
    for layer in convs:
        exact = _exact_trace(net, x, layer.name)
        G, A, (_, _, eigenvalues) = kron[layer.name]
        assert float(eigenvalues.sum()) == pytest.approx(exact, rel=0.1)
        assert float(G.trace() * A.trace()) > exact / 20  # not P-fold too small (P = 784, 100, 1)


def test_ekfac_laplace_chooses_the_prior_by_the_corrected_eigenvalues():
    """``laplace(..., ekfac=True)``: each layer's prior precision is the evidence optimum over EKFAC's
    eigenvalues, and the posterior keeps them (its precision is ``U diag(eigenvalues / δ) U' + I``)."""
    net, x = _small_net(), torch.randn(6, 2, 8, 8)
    layers = find_layers(net)
    kron = curvature(net, layers, x, "kron", seed=2, ekfac=True, progress=False)
    model, posterior = laplace(net, x, "kron", seed=2, ekfac=True, progress=False)
    for layer, record in zip(layers, model.laplace):
        eigenvalues = kron[layer.name][2][2]
        w = layer.join(net)
        assert record["prior_precision"] == pytest.approx(
            prior_precision(eigenvalues, float(w.square().sum()))
        )
        got = posterior.kron[layer.site].eigenvalues()
        assert torch.allclose(got, eigenvalues / record["prior_precision"], rtol=1e-10)


@pytest.mark.parametrize("structure", ["diag", "kron"])
def test_a_gaussian_likelihood_over_several_outputs_is_refused(structure):
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(PyrozooError, match="needs a net with 1 output"):
        curvature(net, find_layers(net), torch.randn(5, 3), structure, likelihood=Gaussian("fixed", 2.0))


@pytest.mark.parametrize(
    "option, message", [({"fisher": "exact"}, "mc, type-2"), ({"kfac": "full"}, "expand, reduce")]
)
def test_an_unknown_curvature_option_is_one_line_naming_the_choices(option, message):
    net = _small_net()
    with pytest.raises(PyrozooError, match=message):
        curvature(net, find_layers(net), torch.randn(2, 2, 8, 8), **option)
