"""Closed forms of Bayesian model reduction, each checked against an independent computation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import MultivariateNormal, Normal

from pyrozoo.bmr.delta_f import (
    ReducedGaussian,
    matrix_normal,
    meanfield,
    multivariate,
    multivariate_covariance,
    point_mass_meanfield,
)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------
# 1. Conjugate Bayesian linear regression: there BMR is exact.


def _log_evidence(X, y, prior_var, noise_var):
    """ln N(y; 0, X diag(prior_var) X' + noise_var I)."""
    cov = (X * prior_var) @ X.T + noise_var * torch.eye(len(y), dtype=F64)
    return MultivariateNormal(torch.zeros(len(y), dtype=F64), covariance_matrix=cov).log_prob(y)


def _posterior(X, y, prior_var, noise_var):
    P = X.T @ X / noise_var + torch.diag(1 / prior_var)
    return torch.linalg.solve(P, X.T @ y / noise_var), P


def _regression(seed, n=30, k=6):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, k, generator=g, dtype=F64)
    y = 2 * torch.randn(n, generator=g, dtype=F64)
    noise_var = 0.2 + 2 * torch.rand((), generator=g, dtype=F64)
    s2 = 0.2 + 3 * torch.rand(k, generator=g, dtype=F64)
    # each weight: 0 = unchanged, 1 = point mass, 2 = small positive variance; make sure all three occur
    kind = torch.randint(0, 3, (k,), generator=g)
    kind[:3] = torch.tensor([0, 1, 2])[torch.randperm(3, generator=g)]
    small = s2 * 10 ** (-3 * torch.rand(k, generator=g, dtype=F64) - 0.5)
    g2 = torch.where(kind == 0, s2, torch.where(kind == 1, torch.zeros_like(s2), small))
    return X, y, noise_var, s2, g2


def _by_covariance(mu, P, s2, g2):
    return multivariate_covariance(mu, torch.linalg.inv(P), s2, g2)


@pytest.mark.parametrize("form", [multivariate, _by_covariance])
@pytest.mark.parametrize("seed", range(8))
def test_multivariate_is_exact_for_conjugate_linear_regression(seed, form):
    X, y, noise_var, s2, g2 = _regression(seed)
    mu, P = _posterior(X, y, s2, noise_var)
    keep = g2 > 0

    red = form(mu, P, s2, g2)

    exact = _log_evidence(X[:, keep], y, g2[keep], noise_var) - _log_evidence(X, y, s2, noise_var)
    torch.testing.assert_close(red.delta_f, exact, rtol=1e-6, atol=1e-10)
    mu_r, P_r = _posterior(X[:, keep], y, g2[keep], noise_var)
    torch.testing.assert_close(red.mean[keep], mu_r, rtol=1e-6, atol=1e-10)
    assert torch.equal(red.mean[~keep], torch.zeros((~keep).sum(), dtype=F64))
    torch.testing.assert_close(red.precision[keep][:, keep], P_r, rtol=1e-9, atol=1e-9)
    assert torch.isinf(torch.diagonal(red.precision)[~keep]).all()


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_multivariate_is_exact_for_conjugate_linear_regression_property(seed):
    test_multivariate_is_exact_for_conjugate_linear_regression(seed, multivariate)
    test_multivariate_is_exact_for_conjugate_linear_regression(seed, _by_covariance)


def test_multivariate_batches_over_leading_dims():
    problems = [_regression(seed) for seed in range(3)]
    posts = [_posterior(X, y, s2, nv) for X, y, nv, s2, _ in problems]
    mu = torch.stack([m for m, _ in posts])
    P = torch.stack([p for _, p in posts])
    s2 = torch.stack([p[3] for p in problems])
    g2 = torch.stack([p[4] for p in problems])
    red = multivariate(mu.reshape(3, 1, 6), P.reshape(3, 1, 6, 6), s2.reshape(3, 1, 6), g2.reshape(3, 1, 6))
    assert red.delta_f.shape == (3, 1) and red.mean.shape == (3, 1, 6) and red.precision.shape == (3, 1, 6, 6)
    for i in range(3):
        one = multivariate(mu[i], P[i], s2[i], g2[i])
        torch.testing.assert_close(red.delta_f[i, 0], one.delta_f)
        torch.testing.assert_close(red.mean[i, 0], one.mean)
    cov = multivariate_covariance(
        mu.reshape(3, 1, 6), torch.linalg.inv(P), s2.reshape(3, 1, 6), g2.reshape(3, 1, 6)
    )
    assert cov.delta_f.shape == (3, 3)  # (3, 1) batch broadcast with the (3,) batch of the covariances
    torch.testing.assert_close(torch.diagonal(cov.delta_f), red.delta_f[:, 0])
    # scalar prior / reduced variances broadcast
    red = multivariate(mu, P, 1.0, 0.0)
    torch.testing.assert_close(red.delta_f, torch.stack([point_mass_multi(m, p, 1.0) for m, p in posts]))


def point_mass_multi(mu, P, s2):
    """Whole group to a point mass: dF = ln q(0) - ln p(0) (multivariate Savage-Dickey)."""
    k = len(mu)
    q0 = MultivariateNormal(mu, precision_matrix=P).log_prob(torch.zeros(k, dtype=F64))
    p0 = Normal(torch.zeros(k, dtype=F64), math.sqrt(s2)).log_prob(torch.zeros(k, dtype=F64)).sum()
    return q0 - p0


def _paper_multivariate(mu, P, s2, g2):
    """The paper's formula, literally (needs 0 < g2)."""
    k = mu.shape[-1]
    M = g2[:, None] * P + torch.eye(k, dtype=F64) - torch.diag(g2 / s2)
    P_r = P + torch.diag(1 / g2 - 1 / s2)
    mu_r = torch.linalg.solve(P_r, P @ mu)
    return (
        -0.5 * torch.linalg.slogdet(M)[1]
        + 0.5 * torch.linalg.slogdet(P)[1]
        + 0.5 * torch.log(s2).sum()
        - 0.5 * mu @ P @ mu
        + 0.5 * (P @ mu) @ mu_r
    ), mu_r


@pytest.mark.parametrize("seed", range(4))
def test_multivariate_agrees_with_papers_formula(seed):
    X, y, noise_var, s2, g2 = _regression(seed)
    g2 = torch.where(g2 > 0, g2, 1e-3 * s2)
    mu, P = _posterior(X, y, s2, noise_var)
    red = multivariate(mu, P, s2, g2)
    df, mu_r = _paper_multivariate(mu, P, s2, g2)
    torch.testing.assert_close(red.delta_f, df, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(red.mean, mu_r, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# 2./3. Mean-field form: 1x1 case of the multivariate one; point-mass limit.


def _random_scalars(seed, n=200, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    mu = 3 * torch.randn(n, generator=g, dtype=dtype)
    pi = 10 ** (4 * torch.rand(n, generator=g, dtype=dtype) - 2)
    s2 = 10 ** (2 * torch.rand(n, generator=g, dtype=dtype) - 1)
    frac = torch.rand(n, generator=g, dtype=dtype)
    frac[::5] = 0.0
    frac[1::5] = 1.0
    return mu, pi, s2, frac * s2


@pytest.mark.parametrize("seed", range(3))
def test_meanfield_equals_one_by_one_multivariate(seed):
    mu, pi, s2, g2 = _random_scalars(seed)
    mf = meanfield(mu, pi, s2, g2)
    mv = multivariate(mu[:, None], pi[:, None, None], s2[:, None], g2[:, None])
    torch.testing.assert_close(mf.delta_f, mv.delta_f, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mf.mean, mv.mean[:, 0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mf.precision, mv.precision[:, 0, 0], rtol=1e-10, atol=1e-10)


def test_meanfield_agrees_with_papers_formula():
    mu, pi, s2, g2 = _random_scalars(0)
    g2 = torch.where(g2 > 0, g2, 1e-3 * s2)
    M = g2 * (pi - 1 / s2) + 1
    pi_r = M / g2
    paper = -0.5 * torch.log(M) + 0.5 * torch.log(pi * s2) - 0.5 * pi * mu**2 + 0.5 * (pi * mu) ** 2 / pi_r
    red = meanfield(mu, pi, s2, g2)
    torch.testing.assert_close(red.delta_f, paper, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(red.mean, pi * mu / pi_r)
    torch.testing.assert_close(red.precision, pi_r)


def test_meanfield_point_mass_limit():
    mu, pi, s2, _ = _random_scalars(1)
    pm = point_mass_meanfield(mu, pi, s2)
    exact = meanfield(mu, pi, s2, 0.0)
    assert torch.equal(exact.delta_f, pm)
    assert torch.equal(exact.mean, torch.zeros_like(mu))
    assert torch.isinf(exact.precision).all()
    # independent: ln q(0) - ln p(0)
    sd = pi.rsqrt()
    zero = torch.zeros_like(mu)
    savage_dickey = Normal(mu, sd).log_prob(zero) - Normal(0.0, s2.sqrt()).log_prob(zero)
    torch.testing.assert_close(pm, savage_dickey, rtol=1e-12, atol=1e-12)
    near = meanfield(mu, pi, s2, 1e-12)
    # first order in g2: d dF / d g2 at 0 = 1/2 (pi^2 mu^2 - pi + 1/s2)
    first_order = pm + 1e-12 * 0.5 * (pi**2 * mu**2 - pi + 1 / s2)
    torch.testing.assert_close(near.delta_f, first_order, rtol=1e-13, atol=1e-12)
    assert not torch.equal(near.delta_f, pm)
    torch.testing.assert_close(near.mean, torch.zeros_like(mu), rtol=0, atol=1e-8)
    torch.testing.assert_close(near.precision, pi - 1 / s2 + 1e12, rtol=1e-12, atol=0)
    # float32 too: the stable form does not cancel at tiny g2
    near32 = meanfield(mu.float(), pi.float(), s2.float(), 1e-12)
    torch.testing.assert_close(near32.delta_f, pm.float(), rtol=1e-5, atol=1e-5)


def test_meanfield_reduced_var_broadcasts():
    mu, pi, s2, g2 = _random_scalars(2, n=12)
    mu, pi = mu.reshape(3, 4), pi.reshape(3, 4)
    full = meanfield(mu, pi, 2.0, torch.full((3, 4), 0.5, dtype=F64))
    for g in (0.5, torch.tensor(0.5, dtype=F64), torch.full((4,), 0.5, dtype=F64)):
        red = meanfield(mu, pi, 2.0, g)
        assert red.delta_f.shape == red.mean.shape == red.precision.shape == (3, 4)
        assert torch.equal(red.delta_f, full.delta_f)
    assert meanfield(mu.float(), pi.float(), 1.0, 0.5).delta_f.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------
# 4. Scalar case against brute-force integration: dF = ln ∫ q(w) p~(w) / p(w) dw.


@pytest.mark.parametrize(
    "mu, pi, s2, g2",
    [
        (0.3, 2.0, 1.0, 0.1),
        (1.5, 4.0, 1.0, 0.5),
        (-2.0, 0.5, 2.0, 0.01),
        (3.0, 1.0, 1.0, 0.9),
        (0.0, 10.0, 1.0, 1.0),
        (-0.7, 25.0, 0.3, 0.002),
        (0.5, 3.0, 1.0, 2.0),  # g2 > s2 is a valid reduction while pi~ > 0
    ],
)
def test_meanfield_matches_numerical_integration(mu, pi, s2, g2):
    sd = pi**-0.5
    w = torch.linspace(mu - 12 * sd, mu + 12 * sd, 200001, dtype=F64)
    log_integrand = (
        Normal(mu, sd).log_prob(w)
        + Normal(0.0, math.sqrt(g2)).log_prob(w)
        - Normal(0.0, math.sqrt(s2)).log_prob(w)
    )
    top = log_integrand.max()
    numeric = torch.log(torch.trapezoid(torch.exp(log_integrand - top), w)) + top
    # reduced posterior moments from the same grid
    density = torch.exp(log_integrand - top)
    mean = torch.trapezoid(density * w, w) / torch.trapezoid(density, w)
    var = torch.trapezoid(density * (w - mean) ** 2, w) / torch.trapezoid(density, w)

    red = meanfield(torch.tensor(mu, dtype=F64), torch.tensor(pi, dtype=F64), s2, g2)
    assert abs(red.delta_f.item() - numeric.item()) < 1e-6
    assert abs(red.mean.item() - mean.item()) < 1e-6
    assert abs(1 / red.precision.item() - var.item()) < 1e-6


# ----------------------------------------------------------------------------------------------------------
# 5. float32 against float64 over extreme but reachable inputs.
#
# Inputs are drawn in float64 and rounded to float32 first, so both computations see the same numbers and
# only float32 arithmetic differs. dF is a sum of three terms, T1 = 1/2 ln(pi s2), T2 = -1/2 ln M and
# T3 = -1/2 pi mu^2 a/M, each computed to a few ulps (eps32 ~ 6e-8) of itself, so
# |error| <~ 10 eps32 (|T1| + |T2| + |T3|). Here pi s2 is in [1e-8, 1e14] and M in [0.9, 1e13], so
# |T1|, |T2| <= 16; T3 <= 0, so |T3| <= |dF| + |T1| + |T2| and the bound is
# ~6e-7 (64 + |dF|) <~ 4e-5 + 6e-7 |dF|: tolerance 1e-4 + 1e-5 |dF| (observed: <= 1.5e-6 (1 + |dF|)).
# Mean and precision are products and quotients of the inputs: relative 1e-5.


def _check_float32(mu, pi, s2, g2):
    mu, pi, s2, g2 = (torch.as_tensor(x, dtype=F64).float() for x in (mu, pi, s2, g2))
    r32 = meanfield(mu, pi, s2, g2)
    r64 = meanfield(mu.double(), pi.double(), s2.double(), g2.double())
    for x in r32:
        assert x.dtype == torch.float32 and not torch.isnan(x).any()
    assert torch.isfinite(r32.delta_f).all() and torch.isfinite(r32.mean).all()
    err = (r32.delta_f.double() - r64.delta_f).abs()
    assert (err <= 1e-4 + 1e-5 * r64.delta_f.abs()).all(), err.max()
    torch.testing.assert_close(r32.mean.double(), r64.mean, rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(r32.precision.double(), r64.precision, rtol=1e-5, atol=0)
    if (g2 == 0).all():
        pm32 = point_mass_meanfield(mu, pi, s2)
        assert torch.isfinite(pm32).all()
        assert torch.equal(pm32, r32.delta_f)


@settings(max_examples=200, deadline=None)
@given(
    log_pi=st.floats(-6, 12),
    mu=st.floats(-1e3, 1e3),
    log_s2=st.floats(-2, 2),
    log_frac=st.one_of(st.just(None), st.floats(-12, -1)),
)
def test_float32_agrees_with_float64_property(log_pi, mu, log_s2, log_frac):
    s2 = 10.0**log_s2
    g2 = 0.0 if log_frac is None else s2 * 10.0**log_frac
    _check_float32(mu, 10.0**log_pi, s2, g2)


@pytest.mark.parametrize("log_frac", [None, -12, -8, -4, -2])
def test_float32_agrees_with_float64_sweep(log_frac):
    g = torch.Generator().manual_seed(0)
    n = 20000
    pi = 10 ** (18 * torch.rand(n, generator=g, dtype=F64) - 6)
    magnitude = 10 ** (6 * torch.rand(n, generator=g, dtype=F64) - 3)
    mu = (2 * torch.rand(n, generator=g, dtype=F64) - 1) * magnitude
    s2 = 10 ** (4 * torch.rand(n, generator=g, dtype=F64) - 2)
    g2 = torch.zeros(n, dtype=F64) if log_frac is None else s2 * 10.0**log_frac
    _check_float32(mu, pi, s2, g2)


def test_covariance_form_is_accurate_in_float32_for_large_precise_groups():
    # One 200-wide row, posterior sds ~1e-3, one weight reduced to a point mass and one shrunk. The precision
    # form's -1/2 mu'P mu + 1/2 |v|^2 cancels (mu'P mu ~ 1e8 here, so float32 loses ~tens of nats); the
    # covariance form has a single non-positive quadratic term and stays at the float32 rounding level of dF.
    g = torch.Generator().manual_seed(0)
    k = 200
    A = torch.randn(k, k, generator=g, dtype=F64)
    P = (A @ A.T / k + torch.eye(k, dtype=F64)) * 1e6
    S = torch.linalg.inv(P)
    S = 0.5 * (S + S.T)
    mu = torch.randn(k, generator=g, dtype=F64)
    g2 = torch.ones(k, dtype=F64)
    g2[0], g2[1] = 0.0, 1e-2
    mu32, S32, g2_32 = mu.float(), S.float(), g2.float()
    ref = multivariate_covariance(mu32.double(), S32.double(), 1.0, g2_32.double())
    torch.testing.assert_close(
        multivariate(mu, P, 1.0, g2).delta_f,
        multivariate_covariance(mu, S, 1.0, g2).delta_f,
        rtol=1e-9,
        atol=1e-6,
    )
    got = multivariate_covariance(mu32, S32, 1.0, g2_32)
    assert got.delta_f.dtype == torch.float32
    assert abs(got.delta_f.item() - ref.delta_f.item()) <= 1e-6 * abs(ref.delta_f.item()) + 1e-3
    torch.testing.assert_close(got.mean.double(), ref.mean, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# 6. Matrix-normal posterior.


def _matrix_normal_problem(seed, rows=4, cols=5):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(rows, cols, generator=g, dtype=F64)
    row_var = 0.05 + torch.rand(rows, generator=g, dtype=F64)
    A = torch.randn(cols, cols, generator=g, dtype=F64)
    col_cov = A @ A.T / cols + 0.3 * torch.eye(cols, dtype=F64)
    s2 = 0.5 + torch.rand(rows, cols, generator=g, dtype=F64)
    frac = torch.rand(rows, cols, generator=g, dtype=F64)
    frac[frac < 0.3] = 0.0
    frac[frac > 0.7] = 1.0
    return mean, row_var, col_cov, s2, frac * s2


@pytest.mark.parametrize("seed", range(3))
def test_matrix_normal_equals_multivariate_with_row_precisions(seed):
    mean, row_var, col_cov, s2, g2 = _matrix_normal_problem(seed)
    red = matrix_normal(mean, row_var, col_cov, s2, g2)
    P = torch.stack([torch.linalg.inv(v * col_cov) for v in row_var])
    ref = multivariate(mean, P, s2, g2)
    assert red.delta_f.shape == (4,)
    torch.testing.assert_close(red.delta_f, ref.delta_f, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(red.mean, ref.mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(red.precision, ref.precision, rtol=1e-9, atol=1e-9)


def test_matrix_normal_with_diagonal_col_cov_is_meanfield():
    mean, row_var, _, s2, g2 = _matrix_normal_problem(7)
    col_var = 0.1 + torch.rand(5, generator=torch.Generator().manual_seed(1), dtype=F64)
    red = matrix_normal(mean, row_var, torch.diag(col_var), s2, g2)
    pi = 1 / (row_var[:, None] * col_var)
    mf = meanfield(mean, pi, s2, g2)
    torch.testing.assert_close(red.delta_f, mf.delta_f.sum(-1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(red.mean, mf.mean, rtol=1e-10, atol=1e-12)
    diagonal = torch.diagonal(red.precision, dim1=-2, dim2=-1)
    torch.testing.assert_close(diagonal, mf.precision, rtol=1e-10, atol=0)
    off = ~torch.eye(5, dtype=torch.bool)
    assert (red.precision[:, off] == 0).all()


# ----------------------------------------------------------------------------------------------------------
# 7. Sanity properties.


def test_no_reduction_changes_nothing():
    mu, pi, s2, _ = _random_scalars(3)
    red = meanfield(mu, pi, s2, s2)
    assert isinstance(red, ReducedGaussian)
    torch.testing.assert_close(red.delta_f, torch.zeros_like(mu), rtol=0, atol=1e-12)
    torch.testing.assert_close(red.mean, mu, rtol=1e-14, atol=0)
    assert torch.equal(red.precision, pi)

    X, y, noise_var, s2, _ = _regression(0)
    mu, P = _posterior(X, y, s2, noise_var)
    red = multivariate(mu, P, s2, s2)
    torch.testing.assert_close(red.delta_f, torch.zeros((), dtype=F64), rtol=0, atol=1e-10)
    torch.testing.assert_close(red.mean, mu, rtol=1e-10, atol=1e-12)
    assert torch.equal(red.precision, P)


def test_sign_of_delta_f():
    # posterior ~ a narrow bump at zero: pruning wins; a weight far from zero in posterior sds: keeping wins
    near_zero = point_mass_meanfield(torch.tensor(0.0), torch.tensor(100.0))
    far = point_mass_meanfield(torch.tensor(2.0), torch.tensor(100.0))
    assert near_zero > 0 and far < 0
    assert meanfield(torch.tensor([0.0, 2.0]), torch.tensor(100.0), 1.0, 1e-4).delta_f.tolist()[0] > 0
    assert meanfield(torch.tensor([0.0, 2.0]), torch.tensor(100.0), 1.0, 1e-4).delta_f.tolist()[1] < 0
    P = torch.tensor([[100.0, 20.0], [20.0, 100.0]])
    assert multivariate(torch.tensor([0.0, 2.0]), P, 1.0, torch.tensor([0.0, 1.0])).delta_f > 0
    assert multivariate(torch.tensor([0.0, 2.0]), P, 1.0, torch.tensor([1.0, 0.0])).delta_f < 0


def test_multivariate_rejects_invalid_reduced_var():
    P = torch.eye(2, dtype=F64)
    mu = torch.zeros(2, dtype=F64)
    with pytest.raises(ValueError):
        multivariate(mu, P, 1.0, torch.tensor([0.5, 1.5], dtype=F64))
    with pytest.raises(ValueError):
        multivariate(mu, P, 1.0, torch.tensor([-0.1, 0.5], dtype=F64))
    with pytest.raises(ValueError):
        multivariate_covariance(mu, P, 1.0, torch.tensor([0.5, 1.5], dtype=F64))
    with pytest.raises(ValueError):
        matrix_normal(mu[None], torch.ones(1, dtype=F64), P, 1.0, 2.0)


def test_gradients_are_finite_and_correct():
    mu, pi, s2, g2 = _random_scalars(4, n=20)
    args = [t.clone().requires_grad_() for t in (mu, pi, s2, g2)]
    meanfield(*args).delta_f.sum().backward()
    assert all(torch.isfinite(a.grad).all() for a in args)  # also at g2 = 0
    positive = (g2 > 0) & (g2 < s2)
    inputs = tuple(t[positive].clone().requires_grad_() for t in (mu, pi, s2, g2))
    assert torch.autograd.gradcheck(lambda *x: meanfield(*x).delta_f, inputs, fast_mode=True)

    X, y, noise_var, s2, g2 = _regression(1)
    mu, P = _posterior(X, y, s2, noise_var)
    mu, P = mu.requires_grad_(), P.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda m, p: multivariate(m, 0.5 * (p + p.T), s2, g2).delta_f, (mu, P), fast_mode=True
    )
    S = torch.linalg.inv(P.detach()).requires_grad_()
    g2 = torch.where(g2 == s2, 0.5 * s2, g2)  # sqrt(1 - g2/s2) is not differentiable at g2 = s2
    assert torch.autograd.gradcheck(
        lambda m, c: multivariate_covariance(m, 0.5 * (c + c.T), s2, g2).delta_f, (mu, S), fast_mode=True
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda():
    mean, row_var, col_cov, s2, g2 = _matrix_normal_problem(0)
    cpu = matrix_normal(mean, row_var, col_cov, s2, g2)
    gpu = matrix_normal(*(t.cuda() for t in (mean, row_var, col_cov, s2, g2)))
    assert gpu.delta_f.is_cuda
    torch.testing.assert_close(gpu.delta_f.cpu(), cpu.delta_f)
    torch.testing.assert_close(gpu.mean.cpu(), cpu.mean)
    mu, pi, s2, g2 = _random_scalars(0)
    torch.testing.assert_close(
        meanfield(mu.cuda(), pi.cuda(), s2.cuda(), g2.cuda()).delta_f.cpu(), meanfield(mu, pi, s2, g2).delta_f
    )
