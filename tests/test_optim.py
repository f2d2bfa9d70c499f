"""AdaBelief against the paper's update written out by hand, and against Adam where the two must differ."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyrozoo.errors import PyrozooError
from pyrozoo.optim import OPTIMIZERS, AdaBelief, Adam


def steps(optimizer_class, grads, lr=0.1, **kwargs):
    """Parameter values after each step when the gradients are ``grads`` (one row per step)."""
    p = torch.zeros(grads.shape[1], dtype=torch.float64, requires_grad=True)
    opt = optimizer_class([p], lr=lr, **kwargs)
    values = []
    for g in grads:
        p.grad = g.clone()
        opt.step()
        values.append(p.detach().clone())
    return torch.stack(values)


def reference_adabelief(grads, lr, beta1=0.9, beta2=0.999, eps=1e-16):
    """Algorithm 2 of Zhuang et al. (2020), one float at a time."""
    out = []
    for column in grads.T.tolist():
        theta, m, s, trace = 0.0, 0.0, 0.0, []
        for t, g in enumerate(column, start=1):
            m = beta1 * m + (1 - beta1) * g
            s = beta2 * s + (1 - beta2) * (g - m) ** 2 + eps
            m_hat, s_hat = m / (1 - beta1**t), s / (1 - beta2**t)
            theta -= lr * m_hat / (math.sqrt(s_hat) + eps)
            trace.append(theta)
        out.append(trace)
    return torch.tensor(out, dtype=torch.float64).T


def test_matches_the_papers_algorithm_step_by_step():
    grads = torch.randn(
        30, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    ) * torch.logspace(-4, 3, 7, dtype=torch.float64)
    torch.testing.assert_close(
        steps(AdaBelief, grads, lr=0.03), reference_adabelief(grads, 0.03), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(
        steps(AdaBelief, grads, lr=0.03, betas=(0.5, 0.9), eps=1e-8),
        reference_adabelief(grads, 0.03, 0.5, 0.9, 1e-8),
        rtol=1e-12,
        atol=0,
    )


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-6, 1e6) | st.floats(-1e6, -1e-6), st.floats(1e-4, 1.0))
def test_first_step_is_lr_over_beta1(g, lr):
    # m1 = 0.1 g and s1 = 0.001 (g - m1)^2 = 0.001 (0.9 g)^2, so after bias correction the step is
    # lr g / (beta1 |g|) = lr g / (0.9 |g|):
    # whatever the gradient's size, as with Adam's lr sign(g), but 1/0.9 longer (eps 0 makes it exact).
    (value,) = steps(AdaBelief, torch.tensor([[g]], dtype=torch.float64), lr=lr, eps=0.0)[0].tolist()
    assert value == pytest.approx(-lr * math.copysign(1 / 0.9, g), rel=1e-9)


def test_a_steady_gradient_takes_longer_steps_than_adam_and_a_noisy_one_about_the_same():
    # The "belief": AdaBelief divides by the gradient's spread around its running mean, Adam by its magnitude.
    # A constant gradient has almost no spread (4.7x Adam's distance here); a gradient whose noise swamps its
    # mean has spread close to magnitude.
    n = 200
    steady = torch.full((n, 1), 0.5, dtype=torch.float64)
    noisy = 0.5 + 5 * torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ratios = [
        (steps(AdaBelief, grads, lr=1e-3)[-1] / steps(torch.optim.Adam, grads, lr=1e-3)[-1]).item()
        for grads in (steady, noisy)
    ]
    assert ratios[0] > 4 and 0.8 < ratios[1] < 1.25


def test_minimises_an_ill_conditioned_quadratic():
    curvature = torch.logspace(-2, 2, 10, dtype=torch.float64)
    target = torch.linspace(-3, 3, 10, dtype=torch.float64)
    p = torch.zeros(10, dtype=torch.float64, requires_grad=True)
    opt = AdaBelief([p], lr=0.05)
    for _ in range(3000):
        opt.zero_grad()
        (0.5 * curvature * (p - target) ** 2).sum().backward()
        opt.step()
    torch.testing.assert_close(p.detach(), target, atol=1e-3, rtol=0)


def test_bad_arguments():
    p = [torch.zeros(1, requires_grad=True)]
    for kwargs in (dict(lr=0.0), dict(lr=1e-3, betas=(1.0, 0.9)), dict(lr=1e-3, eps=-1.0)):
        with pytest.raises(ValueError):
            AdaBelief(p, **kwargs)
    assert OPTIMIZERS["adabelief"] is AdaBelief and issubclass(OPTIMIZERS["adam"], torch.optim.Adam)
    with pytest.raises(PyrozooError, match="unknown optimizer 'sgd'; known optimizers: adam, adabelief"):
        OPTIMIZERS["sgd"]


def test_adam_is_fused_where_torch_has_the_kernel_with_torchs_numbers():
    """The registry's Adam takes torch's fused kernel for CPU parameters (one kernel per parameter, not a dozen)
    and gives torch's unfused trajectory to float rounding, in parameter groups too; an explicit choice stands."""
    grads = torch.randn(20, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(steps(Adam, grads, lr=1e-2), steps(torch.optim.Adam, grads, lr=1e-2, fused=False))
    p = torch.zeros(3, requires_grad=True)
    assert Adam([p]).defaults["fused"] and Adam([{"params": [p]}], lr=0.1).defaults["fused"]
    assert not Adam([p], fused=False).defaults["fused"] and not Adam([p], foreach=True).defaults["fused"]
    assert not Adam([torch.zeros(3, dtype=torch.float64, device="meta", requires_grad=True)]).defaults["fused"]
