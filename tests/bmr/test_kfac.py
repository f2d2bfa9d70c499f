"""The Kronecker-factored BMR forms against the dense forms of the Kronecker product and exact conjugate evidence."""

from __future__ import annotations

import math

import pytest
import torch

from pyrozoo.bmr.delta_f import multivariate_covariance
from pyrozoo.bmr.kfac import KroneckerGaussian

pytestmark = pytest.mark.usefixtures("float64")  # (conftest) these compare with exact forms


def _spd(n: int, generator, scale: float = 1.0, rank: int | None = None) -> torch.Tensor:
    B = torch.randn(n, rank or n, generator=generator)
    return scale * B @ B.T / (rank or n)


def _layer(R=3, K=4, seed=0, prior_var=0.7, ekfac=False) -> KroneckerGaussian:
    """A KFAC layer, or with ``ekfac`` the factors' eigenbasis with eigenvalues of its own (EKFAC)."""
    g = torch.Generator().manual_seed(seed)
    mean, G, A = torch.randn(R, K, generator=g), _spd(R, g, 3.0), _spd(K, g, 5.0, rank=2)
    corrected = None
    if ekfac:
        corrected = (torch.linalg.eigh(G)[1], torch.linalg.eigh(A)[1], 4 * torch.rand(R, K, generator=g))
    return KroneckerGaussian(mean, G, A, prior_var, corrected)


def _dense(layer: KroneckerGaussian):
    if layer.corrected is None:
        data = torch.kron(layer.G, layer.A)
    else:
        u_g, u_a, eigenvalues = layer.corrected
        U = torch.kron(u_g, u_a)
        data = U @ torch.diag(eigenvalues.flatten()) @ U.T
    P = data + torch.eye(layer.mean.numel()) / layer.prior_var
    return layer.mean.flatten(), torch.linalg.inv(P), P


def _dense_reduction(layer: KroneckerGaussian, pruned: torch.Tensor):
    mu, S, P = _dense(layer)
    s2 = torch.full_like(mu, layer.prior_var)
    g2 = torch.where(pruned.flatten(), 0.0, s2)
    return multivariate_covariance(mu, S, s2, g2, precision=P)


@pytest.mark.parametrize("ekfac", [False, True])
def test_marginal_variance_is_the_diagonal_of_the_dense_covariance(ekfac):
    layer = _layer(ekfac=ekfac)
    _, S, _ = _dense(layer)
    assert torch.allclose(layer.marginal_variance().flatten(), torch.diagonal(S), atol=1e-10)
    V = torch.randn(3, 4)
    assert torch.allclose(layer.covariance_matvec(V).flatten(), S @ V.flatten(), atol=1e-10)
    _, _, P = _dense(layer)
    assert torch.allclose(layer.precision_matvec(V).flatten(), P @ V.flatten(), atol=1e-10)
    assert torch.allclose(layer.precision_diagonal().flatten(), torch.diagonal(P), atol=1e-10)


@pytest.mark.parametrize("ekfac", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_single_entries_match_the_dense_form(seed, ekfac):
    layer = _layer(seed=seed, ekfac=ekfac)
    entries = layer.entries()
    for r in range(3):
        for c in range(4):
            pruned = torch.zeros(3, 4, dtype=torch.bool)
            pruned[r, c] = True
            dense = _dense_reduction(layer, pruned)
            assert float(entries[r, c]) == pytest.approx(float(dense.delta_f), abs=1e-6)
            assert torch.allclose(layer.entry_reduced_mean(r, c).flatten(), dense.mean, atol=1e-6)


@pytest.mark.parametrize("ekfac", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_rows_and_columns_match_the_dense_form(seed, ekfac):
    layer = _layer(seed=seed, ekfac=ekfac)
    rows, columns = layer.rows(), layer.columns()
    for r in range(3):
        pruned = torch.zeros(3, 4, dtype=torch.bool)
        pruned[r] = True
        dense = _dense_reduction(layer, pruned)
        assert float(rows[r]) == pytest.approx(float(dense.delta_f), abs=1e-6)
        assert torch.allclose(layer.row_reduced_mean(r).flatten(), dense.mean, atol=1e-6)
    for c in range(4):
        pruned = torch.zeros(3, 4, dtype=torch.bool)
        pruned[:, c] = True
        assert float(columns[c]) == pytest.approx(float(_dense_reduction(layer, pruned).delta_f), abs=1e-6)


@pytest.mark.parametrize("occam", [True, False])
@pytest.mark.parametrize("ekfac", [False, True])
def test_sets_of_whole_columns_or_rows_match_the_dense_form(ekfac, occam):
    """A unit's columns (a convolution's input channel: several columns) or rows reduced together: the dF of
    the dense Gaussian, or without the Occam term its fit term ``-½ M_S' Σ_SS^-1 M_S``; single columns and rows
    agree with :meth:`columns` and :meth:`rows`."""
    layer = _layer(R=4, K=6, seed=7, ekfac=ekfac)
    mu, S, _ = _dense(layer)
    for axis, index in ((1, torch.tensor([[0, 3], [1, 2], [4, 5]])), (0, torch.tensor([[0, 2], [1, 3]]))):
        found = layer.unit_sets(index, axis, occam=occam)
        for u, members in enumerate(index):
            pruned = torch.zeros(4, 6, dtype=torch.bool)
            pruned[(slice(None), members) if axis == 1 else (members, slice(None))] = True
            if occam:
                expected = float(_dense_reduction(layer, pruned).delta_f)
            else:
                s = pruned.flatten()
                expected = float(-0.5 * mu[s] @ torch.linalg.solve(S[s][:, s], mu[s]))
            assert float(found[u]) == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(layer.unit_sets(torch.arange(6)[:, None], 1), layer.columns(), atol=1e-8)
    assert torch.allclose(layer.unit_sets(torch.arange(4)[:, None], 0), layer.rows(), atol=1e-8)


@pytest.mark.parametrize("ekfac", [False, True])
def test_conditional_mean_of_any_set_matches_the_dense_form(ekfac):
    layer = _layer(R=5, K=6, seed=3, ekfac=ekfac)
    pruned = torch.rand(5, 6, generator=torch.Generator().manual_seed(4)) < 0.6
    mean, residual, _ = layer.conditional_mean(pruned, tol=1e-12)
    assert residual < 1e-10
    assert torch.allclose(mean.flatten(), _dense_reduction(layer, pruned).mean, atol=1e-6)
    assert bool((mean[pruned] == 0).all())


def test_a_draw_conditioned_on_the_pruned_entries_has_the_reduced_posteriors_covariance():
    """The same map applied to a draw of the full posterior (``of``) is linear, and sends its covariance ``Σ`` to
    the reduced posterior's: ``P_TT^-1`` on the survivors, 0 on the pruned entries (smaller than ``Σ_TT``)."""
    layer = _layer(R=4, K=5, seed=5)
    pruned = torch.rand(4, 5, generator=torch.Generator().manual_seed(6)) < 0.5
    _, S, P = _dense(layer)
    basis = torch.eye(20)
    C = torch.stack(
        [layer.conditional_mean(pruned, tol=1e-13, of=e.reshape(4, 5))[0].flatten() for e in basis]
    )
    T = ~pruned.flatten()
    reduced = C.T @ S @ C  # the covariance of C' ε for ε ~ N(0, Σ) (rows of C: the images of the basis)
    assert torch.allclose(reduced[T][:, T], torch.linalg.inv(P[T][:, T]), atol=1e-8)
    assert bool((reduced[~T] == 0).all()) and bool((reduced[:, ~T] == 0).all())
    assert float(torch.diagonal(S)[T].sum()) > float(torch.diagonal(reduced)[T].sum())


# --- a conjugate linear regression: KFAC is exact there, so BMR is exact -------------------------------------


def _regression(N=12, R=2, K=4, seed=0, prior_var=1.5):
    """``y_n = W x_n + e_n``, ``e_n ~ N(0, Σ_noise)`` (correlated outputs), ``W ~ N(0, s2 I)``: the exact
    posterior is ``N(M, (Λ ⊗ X'X + I/s2)^-1)`` with ``Λ = Σ_noise^-1``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, K, generator=g)
    noise = _spd(R, g, 0.5) + 0.2 * torch.eye(R)
    W = torch.randn(R, K, generator=g)
    Y = X @ W.T + torch.randn(N, R, generator=g) @ torch.linalg.cholesky(noise).T
    Lam = torch.linalg.inv(noise).contiguous()
    P = torch.kron(Lam, (X.T @ X).contiguous()) + torch.eye(R * K) / prior_var
    M = torch.linalg.solve(P, (Lam @ Y.T @ X).flatten()).reshape(R, K)
    return X, Y, noise, KroneckerGaussian(M, Lam, (X.T @ X).contiguous(), prior_var)


def _log_evidence(X, Y, noise, prior_var, keep: torch.Tensor) -> float:
    """``ln p(Y)`` with only the entries ``keep`` of W random (the others fixed at 0), by the dense marginal."""
    N, K = X.shape
    R = Y.shape[1]
    J = torch.kron(torch.eye(R), X)  # maps row-major vec(W) to the outputs stacked output-major
    J = J[:, keep.flatten()]
    cov = prior_var * J @ J.T + torch.kron(noise, torch.eye(N))
    y = Y.T.flatten()  # output-major, matching J
    return float(torch.distributions.MultivariateNormal(torch.zeros_like(y), cov).log_prob(y))


def _posterior_mean(X, Y, noise, prior_var, keep: torch.Tensor) -> torch.Tensor:
    """The exact posterior mean of the reduced regression (only the entries ``keep`` of W are parameters)."""
    R, K = keep.shape
    Lam = torch.linalg.inv(noise).contiguous()
    k = keep.flatten()
    P = (torch.kron(Lam, (X.T @ X).contiguous()) + torch.eye(R * K) / prior_var)[k][:, k]
    b = (Lam @ Y.T @ X).flatten()[k]
    out = torch.zeros(R * K)
    out[k] = torch.linalg.solve(P, b)
    return out.reshape(R, K)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delta_f_is_the_exact_evidence_difference_of_a_conjugate_regression(seed):
    X, Y, noise, layer = _regression(seed=seed)
    full = torch.ones(layer.shape, dtype=torch.bool)
    log_z = _log_evidence(X, Y, noise, layer.prior_var, full)
    entries, rows, columns = layer.entries(), layer.rows(), layer.columns()
    for r in range(layer.shape[0]):
        keep = full.clone()
        keep[r] = False
        assert float(rows[r]) == pytest.approx(
            _log_evidence(X, Y, noise, layer.prior_var, keep) - log_z, abs=1e-6
        )
        for c in range(layer.shape[1]):
            keep = full.clone()
            keep[r, c] = False
            exact = _log_evidence(X, Y, noise, layer.prior_var, keep) - log_z
            assert float(entries[r, c]) == pytest.approx(exact, abs=1e-6)
    for c in range(layer.shape[1]):
        keep = full.clone()
        keep[:, c] = False
        exact = _log_evidence(X, Y, noise, layer.prior_var, keep) - log_z
        assert float(columns[c]) == pytest.approx(exact, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_written_back_mean_is_the_exact_posterior_mean_of_the_reduced_regression(seed):
    X, Y, noise, layer = _regression(R=3, K=5, seed=seed)
    pruned = torch.rand(3, 5, generator=torch.Generator().manual_seed(seed + 10)) < 0.5
    mean, _, _ = layer.conditional_mean(pruned, tol=1e-12)
    assert torch.allclose(mean, _posterior_mean(X, Y, noise, layer.prior_var, ~pruned), atol=1e-8)
    row = layer.row_reduced_mean(1)
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1] = False
    assert torch.allclose(row, _posterior_mean(X, Y, noise, layer.prior_var, keep), atol=1e-8)
    # and the survivors really moved: compensation is not the identity
    assert not torch.allclose(mean[~pruned], layer.mean[~pruned], atol=1e-3)


def test_log_marginal_terms_match_the_dense_log_determinant():
    layer = _layer()
    logdet, sq = layer.log_marginal_terms()
    _, _, P = _dense(layer)
    assert logdet == pytest.approx(float(torch.logdet(P)), abs=1e-8)
    assert sq == pytest.approx(float(layer.mean.square().sum()))
    assert math.isfinite(logdet)
