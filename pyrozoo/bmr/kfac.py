"""BMR of a Kronecker-factored (KFAC) Gaussian posterior over one layer, without a dense matrix over the layer.

A layer's matrix ``W`` (rows x columns, the bias as the last column) has the prior ``N(0, s2 I)`` and the
posterior ``N(M, P^-1)`` with ``P = G ⊗ A + I / s2`` over the row-major ``vec(W)`` (``G``: rows x rows, the
output-side factor; ``A``: columns x columns, the input-side factor), as a KFAC Laplace approximation gives.
With the eigendecompositions ``G = U_G diag(g) U_G'`` and ``A = U_A diag(a) U_A'``, the covariance is
``Σ = (U_G ⊗ U_A) diag(D) (U_G ⊗ U_A)'`` with ``D[i, j] = 1 / (g_i a_j + 1/s2)``, so everything below costs
matrix products of the layer's size (``R² K + R K²``), never ``(R K)²``. EKFAC (George et al. 2018) keeps that
eigenbasis and replaces ``g_i a_j`` by eigenvalues ``λ_ij`` fitted to the data (``corrected``); every form below
reads only the basis and ``D``, so it holds for both.

Point-mass reductions (docs/method.md#correlated-posteriors with ``g2 = 0`` on the reduced entries ``S``) of a
correlated Gaussian:

    dF_S = ln N(0; M_S, Σ_SS) - ln N(0; 0, s2 I_S)            (the Savage-Dickey ratio)
    M~   = M - Σ_{:,S} Σ_SS^-1 M_S                            (the survivors compensate, as in OBS)

- one entry: ``Σ_SS`` is its marginal variance (:meth:`KroneckerGaussian.marginal_variance`), so the
  mean-field form with the *marginal* precision is exact (:func:`pyrozoo.bmr.delta_f.point_mass_meanfield`);
- one row (a unit: an output neuron or channel with its bias): ``Σ_rr = U_A diag(e_r) U_A'`` with
  ``e_r = (U_G[r]^2) D``, so its determinant and inverse are read off (:meth:`~KroneckerGaussian.rows`);
  one column likewise with the roles of the factors swapped (:meth:`~KroneckerGaussian.columns`);
- a unit's set of whole columns (a convolution's input channel: its k x k columns) or rows: ``Σ_SS`` is
  block-diagonal in the other factor's eigenbasis, one k x k block per eigenvector
  (:meth:`~KroneckerGaussian.unit_sets`);
- any set of entries (what a pass to a target sparsity removes): the reduced mean solves
  ``P_TT (M~_T - M_T) = P_TS M_S`` over the survivors ``T`` (the mean of the Gaussian conditioned on
  ``W_S = 0``), by conjugate gradients with ``P``'s Kronecker product as the operator
  (:meth:`~KroneckerGaussian.conditional_mean`).

Checked against the dense forms of :mod:`pyrozoo.bmr.delta_f` built from the Kronecker product and against the
exact evidence of a conjugate linear regression (tests/bmr/test_kfac.py). Computations run in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pyrozoo.bmr.delta_f import point_mass_meanfield


@dataclass
class KroneckerGaussian:
    """``N(mean, (G ⊗ A + I/prior_var)^-1)`` over a ``(R, K)`` matrix in row-major order (float64 inside)."""

    mean: Tensor  # (R, K)
    G: Tensor  # (R, R), symmetric positive semi-definite
    A: Tensor  # (K, K), symmetric positive semi-definite
    prior_var: float = 1.0
    # EKFAC (George et al. 2018): (U_G, U_A, eigenvalues (R, K)), the data precision U diag(eigenvalues) U' in the
    # factors' eigenbasis U = U_G ⊗ U_A with each eigenvalue fitted to the data instead of g_i a_j
    corrected: tuple | None = None
    _eig: tuple = field(init=False, repr=False)

    def __post_init__(self):
        self.mean = self.mean.detach().double()
        if self.corrected is None:
            g, u_g = torch.linalg.eigh(self.G.detach().double())
            a, u_a = torch.linalg.eigh(self.A.detach().double())
            g, a = g.clamp(min=0), a.clamp(min=0)  # round-off below 0 on a factor that is PSD by construction
            self._eigenvalues = g[:, None] * a[None, :]
        else:
            u_g, u_a, eigenvalues = (t.detach().double() for t in self.corrected)
            g = torch.einsum("ij,ik,kj->j", u_g, self.G.detach().double(), u_g)
            a = torch.einsum("ij,ik,kj->j", u_a, self.A.detach().double(), u_a)
            self._eigenvalues = eigenvalues.clamp(min=0)
        self._eig = (g, u_g, a, u_a, 1 / (self._eigenvalues + 1 / self.prior_var))

    @property
    def shape(self) -> torch.Size:
        return self.mean.shape

    def eigenvalues(self) -> Tensor:
        """The data precision's eigenvalues ``g_i a_j`` (EKFAC: the corrected ones), without the prior, ``(R, K)``."""
        return self._eigenvalues

    def precision_matvec(self, V: Tensor) -> Tensor:
        """``P vec(V)`` as a matrix: ``G V A + V / s2`` (EKFAC: ``U_G (λ ∘ U_G' V U_A) U_A' + V / s2``)."""
        if self.corrected is None:
            return self.G.double() @ V @ self.A.double() + V / self.prior_var
        _, u_g, _, u_a, _ = self._eig
        return u_g @ (self._eigenvalues * (u_g.T @ V @ u_a)) @ u_a.T + V / self.prior_var

    def precision_diagonal(self) -> Tensor:
        """``diag P`` as a ``(R, K)`` matrix."""
        if self.corrected is None:
            return (
                torch.outer(torch.diagonal(self.G.double()), torch.diagonal(self.A.double()))
                + 1 / self.prior_var
            )
        _, u_g, _, u_a, _ = self._eig
        return u_g.square() @ self._eigenvalues @ u_a.square().T + 1 / self.prior_var

    def covariance_matvec(self, V: Tensor) -> Tensor:
        """``Σ vec(V)`` as a matrix."""
        _, u_g, _, u_a, D = self._eig
        return u_g @ (D * (u_g.T @ V @ u_a)) @ u_a.T

    def marginal_variance(self) -> Tensor:
        """``diag Σ`` as a ``(R, K)`` matrix: ``(U_G∘U_G) D (U_A∘U_A)'``."""
        _, u_g, _, u_a, D = self._eig
        return u_g.square() @ D @ u_a.square().T

    def entries(self) -> Tensor:
        """dF of reducing each single entry to a point mass at 0, ``(R, K)`` (its marginal Savage-Dickey ratio)."""
        return point_mass_meanfield(self.mean, 1 / self.marginal_variance(), self.prior_var)

    def entry_reduced_mean(self, r: int, c: int) -> Tensor:
        """The reduced mean after removing entry ``(r, c)`` alone: ``M - Σ e_rc M[r, c] / Σ[rc, rc]`` (OBS)."""
        _, u_g, _, u_a, D = self._eig
        column = u_g @ (D * torch.outer(u_g[r], u_a[c])) @ u_a.T  # Σ e_rc as a matrix
        out = self.mean - column * (self.mean[r, c] / column[r, c])
        out[r, c] = 0.0
        return out

    # --- whole rows and columns (units) ---------------------------------------------------------------------

    def _row_terms(self) -> tuple[Tensor, Tensor]:
        """``e[r, j]``, the eigenvalues of ``Σ_rr`` in the basis ``U_A``, and ``q = M U_A``."""
        _, u_g, _, u_a, D = self._eig
        return u_g.square() @ D, self.mean @ u_a

    def rows(self) -> Tensor:
        """dF of reducing each whole row to a point mass at 0, shape ``(R,)``."""
        e, q = self._row_terms()
        return 0.5 * (math.log(self.prior_var) - e.log()).sum(1) - 0.5 * (q.square() / e).sum(1)

    def row_reduced_mean(self, r: int) -> Tensor:
        """The reduced mean after removing row ``r``: ``M - Σ_{:,r} Σ_rr^-1 M_r``."""
        _, u_g, _, u_a, D = self._eig
        e, q = self._row_terms()
        out = self.mean - u_g @ (D * torch.outer(u_g[r], q[r] / e[r])) @ u_a.T
        out[r] = 0.0
        return out

    def columns(self) -> Tensor:
        """dF of reducing each whole column (an input of every row) to a point mass at 0, shape ``(K,)``."""
        _, u_g, _, u_a, D = self._eig
        e = D @ u_a.square().T  # (R eigen-index, K): eigenvalues of Σ_cc in the basis U_G
        q = u_g.T @ self.mean
        return 0.5 * (math.log(self.prior_var) - e.log()).sum(0) - 0.5 * (q.square() / e).sum(0)

    def unit_sets(self, index: Tensor, axis: int, occam: bool = True) -> Tensor:
        """dF of reducing, per unit ``u``, the whole columns ``index[u]`` (``axis=1``: e.g. a convolution's input
        channel, its k x k columns) or rows (``axis=0``) to a point mass at 0, shape ``(count,)``.

        The set ``S`` spans every row (column), so rotating the rows by ``U_G`` (the columns by ``U_A``) keeps it
        whole, and there ``Σ_SS`` is block-diagonal: one ``k x k`` block ``B_p = U_A[S] diag(D[p]) U_A[S]'`` per
        eigenvector ``p`` of the other factor. Its determinant and ``M_S' Σ_SS^-1 M_S`` are sums over ``p`` of
        ``k x k`` ones: exact, the prior included, at ``R k² K`` per unit rather than ``(R k)³``. ``occam=False``
        keeps the fit term alone, ``-½ M_S' Σ_SS^-1 M_S``: the reduced model at its best weights with the
        survivors compensating (Optimal Brain Surgeon's saliency for the set, with the prior's curvature)."""
        _, u_g, _, u_a, D = self._eig
        # the set's side (its eigenvectors), the rotated mean (eigen-index of the other side, set side), D
        u_set, rotated, d = (u_a, u_g.T @ self.mean, D) if axis == 1 else (u_g, u_a.T @ self.mean.T, D.T)
        index = index.to(self.mean.device)
        k = index.shape[1]
        out = []
        per_unit = len(d) * k * k * d.shape[1]
        for chunk in index.split(max(1, 2**24 // max(per_unit, 1))):  # a few hundred MB of float64 at most
            us = u_set[chunk]  # (units, k, Q)
            blocks = torch.einsum("ukq,ulq,pq->upkl", us, us, d)  # (units, P, k, k)
            m = rotated[:, chunk].permute(1, 0, 2)  # (units, P, k)
            L = torch.linalg.cholesky(blocks)
            fit = (m * torch.cholesky_solve(m.unsqueeze(-1), L).squeeze(-1)).sum((1, 2))
            if occam:
                logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum((1, 2))
                n = k * len(d)
                out.append(0.5 * (n * math.log(self.prior_var) - logdet) - 0.5 * fit)
            else:
                out.append(-0.5 * fit)
        return torch.cat(out)

    # --- any set of entries -------------------------------------------------------------------------------

    def conditional_mean(
        self, pruned: Tensor, tol: float = 1e-6, max_iter: int = 500, of: Tensor | None = None
    ) -> tuple[Tensor, float, int]:
        """The reduced mean after removing the entries ``pruned`` (bool ``(R, K)``) together.

        Solves ``P_TT x = P_TS M_S`` over the survivors ``T`` by conjugate gradients, preconditioned by
        ``diag P``; returns ``(M~, relative residual, iterations)``. ``M~`` is 0 on ``pruned``. With ``of``, the
        same map applied to that matrix in place of the mean: of a draw ``ε ~ N(0, Σ)``, it gives a draw of the
        conditional ``N(0, P_TT^-1)`` on the survivors (Matheron's rule), 0 on ``pruned``.
        """
        mean = self.mean if of is None else of.to(self.mean)
        pruned = pruned.to(self.mean.device).bool()
        keep = (~pruned).double()
        if not bool(pruned.any()):
            return mean.clone(), 0.0, 0
        source = torch.where(pruned, mean, 0.0)  # M_S, zero elsewhere
        b = keep * self.precision_matvec(source)  # P_TS M_S
        inv_diag = keep / self.precision_diagonal()
        x = torch.zeros_like(b)
        r = b.clone()
        z = inv_diag * r
        p = z.clone()
        rz = float((r * z).sum())
        norm_b = float(b.norm()) or 1.0
        iterations, residual = 0, float(r.norm()) / norm_b
        while residual > tol and iterations < max_iter:
            Ap = keep * self.precision_matvec(p)
            alpha = rz / float((p * Ap).sum())
            x += alpha * p
            r -= alpha * Ap
            z = inv_diag * r
            rz_new = float((r * z).sum())
            p = z + (rz_new / rz) * p
            rz = rz_new
            iterations += 1
            residual = float(r.norm()) / norm_b
        return torch.where(pruned, 0.0, mean + x), residual, iterations

    def log_marginal_terms(self) -> tuple[float, float]:
        """``(sum ln(g_i a_j + 1/s2), |M|^2)``: what the Laplace evidence needs of this layer."""
        return float((-self._eig[4].log()).sum()), float(self.mean.square().sum())
