"""Closed forms of Bayesian model reduction (docs/method.md#delta-f) for Gaussian posteriors and priors.

A full model has the prior ``N(0, s2)`` and the (approximate) posterior ``q = N(mu, P^-1)``. The reduced model
differs only in its prior, ``N(0, g2)`` with ``0 <= g2 <= s2`` (``g2 = 0``: a point mass at zero, ``g2 = s2``:
unchanged). Without data or retraining, BMR gives

    dF = F(reduced) - F(full) = ln E_q[p~(w) / p(w)]

and the reduced posterior ``q~ ∝ q p~ / p``; for a Gaussian-likelihood model with the exact posterior q both
are exact. ``dF > 0`` means the reduced model (e.g. the weight fixed at zero) has the higher evidence.

All functions broadcast, run on any device and dtype (results in the inputs' floating dtype) and are
differentiable in the posterior parameters. Forms are chosen to avoid cancellation (see each docstring).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "ReducedGaussian",
    "point_mass_meanfield",
    "meanfield",
    "multivariate",
    "multivariate_covariance",
    "matrix_normal",
]


class ReducedGaussian(NamedTuple):
    """The closed-form result of reducing a Gaussian posterior: dF and the reduced posterior
    ``N(mean, precision^-1)``."""

    delta_f: Tensor  # shape = batch shape
    mean: Tensor  # reduced posterior mean (0 where reduced to a point mass)
    precision: Tensor  # mean-field: elementwise; multivariate: matrix; inf where reduced to a point mass


def _dtype(*xs) -> torch.dtype:
    """Common floating dtype of the tensor arguments (default dtype if none is a floating tensor)."""
    dtype = None
    for x in xs:
        if isinstance(x, Tensor) and x.is_floating_point():
            dtype = x.dtype if dtype is None else torch.promote_types(dtype, x.dtype)
    return torch.get_default_dtype() if dtype is None else dtype


def _device(*xs) -> torch.device | None:
    for x in xs:
        if isinstance(x, Tensor) and x.dim() > 0:
            return x.device
    for x in xs:
        if isinstance(x, Tensor):
            return x.device
    return None


def _tensors(*xs):
    dtype, device = _dtype(*xs), _device(*xs)
    return [torch.as_tensor(x, dtype=dtype, device=device) for x in xs]


def point_mass_meanfield(mu, precision, prior_var=1.0) -> Tensor:
    """dF of reducing the prior ``N(0, s2)`` to a point mass at 0, for the posterior ``N(mu, 1/pi)``.

    The log Savage-Dickey ratio ``ln q(0) - ln p(0)``:

        dF = 1/2 ln(pi s2) - 1/2 pi mu^2

    computed as ``0.5 (ln pi + ln s2) - 0.5 pi mu mu`` in the inputs' dtype: no overflow or cancellation
    beyond the one inherent in the difference, finite in float32 for ``pi`` in [1e-6, 1e12] and
    ``|mu| <= 1e3`` (``pi mu^2`` overflows float32 only beyond ``|mu| sqrt(pi) ~ 1.8e19``).
    """
    mu, pi, s2 = _tensors(mu, precision, prior_var)
    return 0.5 * (torch.log(pi) + torch.log(s2)) - 0.5 * pi * mu * mu


def meanfield(mu, precision, prior_var=1.0, reduced_var=0.0) -> ReducedGaussian:
    """Elementwise BMR of ``N(0, s2)`` to ``N(0, g2)`` for the posterior ``N(mu, 1/pi)``.

    With ``a = 1 - g2/s2`` and ``M = g2 (pi - 1/s2) + 1 = g2 pi + a`` (paper's M):

        dF  = 1/2 ln(pi s2) - 1/2 ln M - 1/2 pi mu^2 a / M
        pi~ = pi + (1/g2 - 1/s2)             (= M / g2; inf at g2 = 0)
        mu~ = pi mu g2 / M                   (= pi mu / pi~; 0 at g2 = 0)

    This equals the paper's ``-1/2 ln M + 1/2 ln(pi s2) - 1/2 pi mu^2 + 1/2 (pi mu)^2 / pi~`` (the last two
    terms combine to ``1/2 pi mu^2 (pi g2 - M)/M = -1/2 pi mu^2 a / M``) without its cancellation (in float32,
    for pi in [1e-6, 1e12] and |mu| <= 1e3, that costs up to ~1e-2 (1 + |dF|) at g2 = 1e-8 s2 and grows
    with g2, to ~1e10 at g2 = s2). ``ln M`` is ``log1p(g2 pi - g2/s2)`` when ``M >= 1/2`` (accurate for
    small g2), else ``log(g2 pi + a)`` (a sum of non-negative terms; exactly ``M = s2 pi`` at ``g2 = s2``,
    where ``1 + x`` would cancel).
    Where ``g2 = 0`` the direct limit :func:`point_mass_meanfield` is used. ``reduced_var`` may be a scalar or
    a tensor broadcasting with ``mu``. The forms need ``M > 0``, which ``g2 <= s2`` guarantees (not checked;
    ``g2 > s2`` is fine while ``pi > 1/s2 - 1/g2``). Differentiable in all arguments, also at ``g2 = 0``.
    """
    mu, pi, s2, g2 = _tensors(mu, precision, prior_var, reduced_var)
    point = g2 == 0
    r = g2 / s2
    a = 1 - r
    x = g2 * pi - r  # M - 1
    m = g2 * pi + a
    big = x >= -0.5
    log_m = torch.where(big, torch.log1p(x.clamp(min=-0.5)), torch.log(torch.where(big, 1.0, m)))
    general = 0.5 * (torch.log(pi) + torch.log(s2)) - 0.5 * log_m - 0.5 * pi * mu * mu * a / m
    delta_f = torch.where(point, point_mass_meanfield(mu, pi, s2), general)
    g2_safe = torch.where(point, 1.0, g2)
    precision_r = torch.where(point, torch.inf, pi + (1 / g2_safe - 1 / s2))
    mean_r = torch.where(point, 0.0, pi * mu * g2 / m)
    shape = torch.broadcast_shapes(mu.shape, pi.shape, s2.shape, g2.shape)
    return ReducedGaussian(delta_f.expand(shape), mean_r.expand(shape), precision_r.expand(shape))


def _group_args(mu, S, s2, g2):
    """Check ``0 <= g2 <= s2``; broadcast to a common batch: vectors ``(..., k)``, matrix ``(..., k, k)``."""
    if bool((g2 < 0).any()) or bool((g2 > s2).any()):
        raise ValueError("multivariate BMR needs 0 <= reduced_var <= prior_var elementwise")
    shape = torch.broadcast_shapes(mu.shape, S.shape[:-1], s2.shape, g2.shape)
    return mu.expand(shape), S.expand(shape + shape[-1:]), s2.expand(shape), g2.expand(shape)


def _reduced_precision(P, s2, g2):
    """``P + diag(1/g2 - 1/s2)``, inf on the diagonal where g2 = 0 (and finite gradients elsewhere)."""
    point = g2 == 0
    g2_safe = torch.where(point, 1.0, g2)
    return P + torch.diag_embed(torch.where(point, torch.inf, 1 / g2_safe - 1 / s2))


def multivariate(mu, precision, prior_var, reduced_var) -> ReducedGaussian:
    """BMR of a correlated Gaussian posterior ``N(mu, P^-1)`` from ``N(0, diag(s2))`` to ``N(0, diag(g2))``.

    Shapes: ``mu (..., k)``, ``precision (..., k, k)`` symmetric positive definite, ``prior_var`` and
    ``reduced_var`` broadcastable to ``(..., k)`` with ``0 <= g2 <= s2`` (``g2 = s2``: entry not reduced,
    ``g2 = 0``: point mass at zero); leading dims are a batch (e.g. the rows of a layer). Paper: with
    ``M = diag(g2) P + I - diag(g2/s2)``, ``P~ = P + diag(1/g2 - 1/s2)``, ``mu~ = P~^-1 P mu``,

        dF = -1/2 ln|M| + 1/2 ln|P| + 1/2 sum ln s2 - 1/2 mu' P mu + 1/2 (P mu)' mu~.

    Computed without infinities for any mix of ``g2 = 0`` and ``g2 = s2``: with ``D = diag(sqrt g2)`` and
    ``a = 1 - g2/s2``, ``M' = D P D + diag(a)`` is SPD with ``|M'| = |M|`` (``M = D M' D^-1`` where D is
    invertible, by continuity elsewhere) and ``P~ = D^-1 M' D^-1``. With ``C = chol(M')``, ``L = chol(P)``,
    ``b = P mu`` and ``v = C^-1 D b``:

        dF  = -sum ln diag C + sum ln diag L + 1/2 sum ln s2 - 1/2 |L' mu|^2 + 1/2 |v|^2
        mu~ = D C^-T v                          (0 where g2 = 0)
        P~  = P + diag(1/g2 - 1/s2)             (inf on the diagonal where g2 = 0)

    ``-1/2 |L' mu|^2 + 1/2 |v|^2`` cancels when little is reduced relative to the whole group (absolute error
    ~ eps mu'P mu: tens of nats in float32 for a 500-wide row with precisions ~1e6); use float64 here, or
    :func:`multivariate_covariance`, which has no such cancellation. Not differentiable in ``reduced_var``
    where it is 0 (``sqrt``). Raises ``ValueError`` unless ``0 <= g2 <= s2``.
    """
    mu, P, s2, g2 = _tensors(mu, precision, prior_var, reduced_var)
    mu, P, s2, g2 = _group_args(mu, P, s2, g2)

    sqrt_g2 = torch.sqrt(g2)
    a = 1 - g2 / s2
    m_prime = sqrt_g2.unsqueeze(-1) * P * sqrt_g2.unsqueeze(-2) + torch.diag_embed(a)
    C = torch.linalg.cholesky(m_prime)
    L = torch.linalg.cholesky(P)
    b = (P @ mu.unsqueeze(-1)).squeeze(-1)
    v = torch.linalg.solve_triangular(C, (sqrt_g2 * b).unsqueeze(-1), upper=False)
    lt_mu = L.mT @ mu.unsqueeze(-1)
    delta_f = (
        -torch.log(torch.diagonal(C, dim1=-2, dim2=-1)).sum(-1)
        + torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        + 0.5 * torch.log(s2).sum(-1)
        - 0.5 * lt_mu.square().sum((-2, -1))
        + 0.5 * v.square().sum((-2, -1))
    )
    mean_r = sqrt_g2 * torch.linalg.solve_triangular(C.mT, v, upper=True).squeeze(-1)
    return ReducedGaussian(delta_f, mean_r, _reduced_precision(P, s2, g2))


def multivariate_covariance(mu, covariance, prior_var, reduced_var, precision=None) -> ReducedGaussian:
    """As :func:`multivariate` for a posterior given by its covariance ``S = P^-1``; no cancellation.

    Shapes and conditions as in :func:`multivariate`. With ``A = diag(a)``, ``a = 1 - g2/s2``, the matrix
    ``N = A^1/2 S A^1/2 + diag(g2)`` is SPD for any mix of ``g2 = 0`` and ``g2 = s2``, ``|M| = |P| |N|`` and
    ``P~^-1 = S - S A^1/2 N^-1 A^1/2 S`` (Woodbury), so with ``C = chol(N)`` and ``u = C^-1 A^1/2 mu``:

        dF  = -sum ln diag C + 1/2 sum ln s2 - 1/2 |u|^2
        mu~ = mu - S A^1/2 C^-T u               (set to exactly 0 where g2 = 0)

    The quadratic term is ``-1/2 mu'(S + diag(g2 s2/(s2 - g2)))^-1 mu``, a single non-positive term: unlike
    :func:`multivariate` nothing cancels, so float32 stays accurate for large, precise groups. ``precision``
    (``P``, for the returned ``P~``) is computed from ``S`` by a Cholesky inverse when not given. Not
    differentiable in ``reduced_var`` where ``g2 = s2`` (``sqrt``). Raises ``ValueError`` unless
    ``0 <= g2 <= s2``.
    """
    mu, S, s2, g2 = _tensors(mu, covariance, prior_var, reduced_var)
    mu, S, s2, g2 = _group_args(mu, S, s2, g2)
    sqrt_a = torch.sqrt(1 - g2 / s2)
    N = sqrt_a.unsqueeze(-1) * S * sqrt_a.unsqueeze(-2) + torch.diag_embed(g2)
    C = torch.linalg.cholesky(N)
    u = torch.linalg.solve_triangular(C, (sqrt_a * mu).unsqueeze(-1), upper=False)
    delta_f = (
        -torch.log(torch.diagonal(C, dim1=-2, dim2=-1)).sum(-1)
        + 0.5 * torch.log(s2).sum(-1)
        - 0.5 * u.square().sum((-2, -1))
    )
    w = sqrt_a * torch.linalg.solve_triangular(C.mT, u, upper=True).squeeze(-1)
    mean_r = torch.where(g2 == 0, 0.0, mu - (S @ w.unsqueeze(-1)).squeeze(-1))
    if precision is None:
        precision = torch.cholesky_inverse(torch.linalg.cholesky(S))
        precision = 0.5 * (precision + precision.mT)
    else:
        precision = torch.as_tensor(precision, dtype=S.dtype, device=S.device)
    return ReducedGaussian(delta_f, mean_r, _reduced_precision(precision.expand(S.shape), s2, g2))


def matrix_normal(mean, row_var, col_cov, prior_var, reduced_var) -> ReducedGaussian:
    """BMR of a (rows x cols) matrix with independent rows, row ``r ~ N(mean[r], row_var[r] col_cov)``.

    Shapes: ``mean (..., R, K)``, ``row_var (..., R)``, ``col_cov (..., K, K)`` SPD; ``prior_var`` and
    ``reduced_var`` broadcast with ``mean``. Batched over rows with the row covariances
    ``S_r = row_var[r] col_cov`` by :func:`multivariate_covariance` (no per-row inverse, float32-safe); the
    row precisions ``P_r = col_cov^-1 / row_var[r]`` for the returned ``P~`` come from one Cholesky inverse of
    ``col_cov``. Equals :func:`multivariate` with those ``P_r``. Returns one ``delta_f`` per row, shape
    ``(..., R)``: rows are independent, so a layer's total dF is ``delta_f.sum(-1)``; ``precision`` is
    ``(..., R, K, K)``.
    """
    mean, row_var, col_cov, s2, g2 = _tensors(mean, row_var, col_cov, prior_var, reduced_var)
    col_prec = torch.cholesky_inverse(torch.linalg.cholesky(col_cov))
    col_prec = 0.5 * (col_prec + col_prec.mT)
    row_var = row_var[..., None, None]
    S = col_cov.unsqueeze(-3) * row_var
    P = col_prec.unsqueeze(-3) / row_var
    return multivariate_covariance(mean, S, s2, g2, precision=P)
