"""Laplace approximations after training: a posterior for BMR from any trained network, diagonal or KFAC.

Given trained weights ``w*`` (a ``flat-map`` run's point estimate, or any ``nn.Module``'s own weights), the
Laplace posterior of a layer's matrix ``W`` (bias as its last column, as in the model's latent) is
``N(w*, (H + δ I)^-1)`` under the prior ``N(0, 1/δ)``, with ``H`` the layer's block of the generalised
Gauss-Newton matrix (GGN) summed over the training set, diagonal or Kronecker-factored (``H ≈ G ⊗ A``), and
the prior precision ``δ`` of each layer chosen by the Laplace marginal likelihood (:func:`prior_precision`),
the evidence that BMR's dF also measures.

The frame BMR reads: the model built here (:func:`laplace`) is a :class:`~pyrozoo.models.BayesianModel` whose
prior is that Gaussian, ``w = s z`` with ``s = δ^-1/2`` and ``z ~ N(0, 1)``, so the posterior of the latent is
``N(w*/s, (H/δ + I)^-1)`` and every reduction of :mod:`pyrozoo.bmr` applies unchanged: dF of a point mass at 0 on
an entry or a unit is the evidence gain of that reduced prior against this Gaussian prior. Under KFAC the
posterior is correlated: a single entry's dF is exact with its marginal variance, and
:meth:`LaplacePosterior.reduce` writes back the reduced mean, so the surviving weights compensate for the
removed ones (:mod:`pyrozoo.bmr.kfac`).

The curvature (:func:`curvature`):

- KFAC is curvlinops' ``KFACLinearOperator`` with ``separate_weight_and_bias=False``: one Kronecker block per
  layer over ``[W | b]``, the input factor over the inputs augmented by a constant 1 (Martens and Grosse 2015),
  as a pyrozoo unit is a row of ``[W | b]`` removed with its bias (laplace-torch's wrapper keeps the bias as a
  block of its own). For a convolution (Grosse and Martens 2016; Eschenhagen et al. 2023) ``"expand"`` (the
  default) sums ``G`` over images and output positions and averages ``A`` over both, so ``G ⊗ A`` is a sum over
  the data; ``"reduce"`` sums the output gradients and averages the patches over the positions of each image
  first. (Before curvlinops, pyrozoo divided ``G`` by the positions as well: a conv layer's curvature was too
  small by their number, 784x for LeNet's first conv.) The expand factors drop the GGN's cross-position terms,
  which images correlate strongly: on LeNet, conv1's KFAC trace is about 0.1x the exact GGN block's.
  ``ekfac=True`` refits the eigenvalues in the factors' eigenbasis (EKFAC, George et al. 2018; curvlinops'
  ``EKFACLinearOperator``, one more pass), whose trace is the exact block's. curvlinops averages a grouped
  convolution's input channels over its groups, an approximation for those layers.
- The GGN is, by default (``fisher="mc"``), the Fisher of the net's own predictive estimated by Monte Carlo
  (``samples`` targets drawn per input, Martens and Grosse; unbiased for the GGN of the categorical likelihood,
  and of the Gaussian one with its noise held at a point), one backward pass per batch and sample;
  ``fisher="type-2"`` is the exact GGN, one backward pass per output.
- The diagonal is hand-written (per-example gradients, squared): curvlinops estimates a diagonal only
  stochastically (Hutchinson, XDiag: many products), and BackPACK's exact one needs the net rebuilt from its own
  modules. It is the exact GGN diagonal (type-2) or its Monte Carlo estimate, checked against the GGN from
  the exact GGN's Jacobians on Linear, strided and padded, grouped and depthwise layers
  (tests/posteriors/test_laplace_curvature.py).

The marginal likelihood's optimum is a one-dimensional root per layer given the eigenvalues (KFAC's ``g_i a_j``,
EKFAC's refitted ones), which needs no optimiser. Linear and Conv2d layers are supported; other random groups
(LayerNorm, free tensors) are an error naming them.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints
from tqdm.auto import tqdm

from pyrozoo.bmr.kfac import KroneckerGaussian
from pyrozoo.bmr.rebuild import rebuild
from pyrozoo.distributed import World
from pyrozoo.errors import PyrozooError
from pyrozoo.guides.base import Posterior
from pyrozoo.models import BayesianModel
from pyrozoo.models.layers import find_layers
from pyrozoo.models.likelihoods import Categorical, Gaussian
from pyrozoo.posteriors.linearised import check_predictive

with warnings.catch_warnings():
    # curvlinops imports linear_operator, which calls torch.jit.script at import (deprecated in torch 2.14)
    warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
    from curvlinops import EKFACLinearOperator, KFACLinearOperator
    from curvlinops.kfac_utils import loss_hessian_matrix_sqrt

STRUCTURES = ("diag", "kron")
FISHERS = ("mc", "type-2")  # curvlinops' names: the Monte Carlo Fisher, the exact GGN
KFAC_APPROX = ("expand", "reduce")


class FixedScales:
    """A prior with one fixed scale per layer and no hyperparameters: ``w = scales[layer] * z``."""

    def __init__(self, scales: dict[str, float]):
        self.scales = dict(scales)
        self.__name__ = "laplace-gaussian"

    def __call__(self, layer):
        return layer.const(self.scales[layer.name])


# --- curvature ------------------------------------------------------------------------------------------------


def _loss(likelihood) -> tuple[nn.Module, float]:
    """curvlinops' loss for ``likelihood`` and the factor from that loss's curvature to the likelihood's: the
    summed cross-entropy for a categorical one; for a Gaussian of precision ``tau`` the summed squared error, whose
    Hessian ``2`` (noise variance 1/2) is rescaled to ``tau``."""
    if isinstance(likelihood, Gaussian):
        return nn.MSELoss(reduction="sum"), float(likelihood.precision()) / 2
    if isinstance(likelihood, Categorical):
        return nn.CrossEntropyLoss(reduction="sum"), 1.0
    raise PyrozooError(
        f"the Laplace curvature is taken under a categorical or Gaussian likelihood, not {type(likelihood).__name__}"
    )


def _kfac(net, modules, x, loss, scale, batch_size, samples, seed, progress, fisher, kfac, ekfac) -> dict:
    """``{layer: (G, A)}`` from curvlinops' KFAC: ``G`` summed over images and positions, ``A`` averaged; with
    ``ekfac`` also the eigenvalues corrected in the factors' eigenbasis, ``(G, A, (U_G, U_A, eigenvalues))``.
    """
    params = [p for module in modules.values() for p in module.parameters(recurse=False)]
    target = (
        torch.zeros(len(x), dtype=torch.long)
        if isinstance(loss, nn.CrossEntropyLoss)
        else torch.zeros(len(x), 1)
    )
    batches = [(x[i : i + batch_size], target[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    operator = (EKFACLinearOperator if ekfac else KFACLinearOperator)(
        net,
        loss,
        params,
        batches,
        progressbar=progress,
        check_deterministic=False,
        seed=seed,
        fisher_type=fisher,
        mc_samples=samples if fisher == "mc" else 1,
        kfac_approx=kfac,
        num_per_example_loss_terms=1,
        separate_weight_and_bias=False,  # one block per layer over [W | b], as the latent
        num_data=len(x),
    )
    operator.compute_kronecker_factors()
    out = {
        name: (
            operator._gradient_covariances[name].double() * scale,
            operator._input_covariances[name].double(),
        )
        for name in modules
    }
    if ekfac:  # a second pass: the per-example gradients' second moments in the eigenbasis
        operator.compute_eigenvalue_correction()
        for name in modules:
            eigenvalues = operator._corrected_eigenvalues[name]
            if isinstance(eigenvalues, dict):  # a layer without a bias: {weight's position: eigenvalues}
                (eigenvalues,) = eigenvalues.values()
            corrected = (
                operator._gradient_covariances_eigenvectors[name],
                operator._input_covariances_eigenvectors[name],
                eigenvalues.double() * scale,
            )
            out[name] = (*out[name], corrected)
    return out


def _scaled(curvature: torch.Tensor | tuple, factor: float) -> torch.Tensor | tuple:
    """A layer's curvature times ``factor``: the diagonal, KFAC's output-side factor and EKFAC's eigenvalues."""
    if isinstance(curvature, torch.Tensor):
        return curvature * factor
    G, A, *corrected = curvature
    return (G * factor, A, *[(u_g, u_a, eigenvalues * factor) for u_g, u_a, eigenvalues in corrected])


def _gaussian(mean: torch.Tensor, curvature: tuple) -> KroneckerGaussian:
    """The Kronecker Gaussian of a layer's KFAC (or EKFAC) curvature under a unit prior."""
    G, A, *corrected = curvature
    return KroneckerGaussian(mean, G, A, prior_var=1.0, corrected=corrected[0] if corrected else None)


def _inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's inputs, one row per image, position and channel group, with a trailing 1 for the bias:
    ``(B, P, groups, K)``."""
    groups = getattr(module, "groups", 1)
    if isinstance(module, nn.Linear):
        a = x.reshape(len(x), 1, 1, -1)
    else:
        a = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        a = a.reshape(len(x), groups, -1, a.shape[-1]).permute(0, 3, 1, 2)
    if module.bias is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
    return a


def _diagonal(
    net, modules, x, likelihood, loss, scale, batch_size, samples, seed, progress, fisher, world
) -> dict:
    """``{layer: (R, K)}``: the squared per-example gradients of the sampled (``"mc"``) or of each column of the
    loss Hessian's square root (``"type-2"``) backpropagated, summed. In a run of several processes (``world``)
    each takes its part of every batch (the labels drawn for the whole batch, as one process draws them), and
    the parts' sums are added up over the processes: every one gets the one-process sum, up to rounding."""
    store: dict = {}

    def add(name, a, g):
        n, positions, groups, _ = a.shape
        g = (g.flatten(2).transpose(1, 2) if g.dim() > 2 else g[:, None]).reshape(n, positions, groups, -1)
        # a batch's sum in the net's own dtype, the running sum in float64: converting the (N, P, K) patches
        # to float64 cost as much as the product (resnet20); float32 sums agree to about 1e-6 (tested)
        if positions == 1 and groups == 1:  # a Linear layer: no (N, R, K) tensor
            d = g[:, 0, 0].square().T @ a[:, 0, 0].square()
        else:
            d = torch.einsum("npgr,npgk->ngrk", g, a).square().sum(0).flatten(0, 1)
        if name in store:
            store[name].add_(d)  # in place: a second (R, K) float64 tensor of a large layer is hundreds of MB
        else:
            store[name] = d.double()

    def capture(module, inputs, output, name):
        a = _inputs(module, inputs[0].detach())
        output.register_hook(lambda g: add(name, a, g.detach()))

    handles = [
        module.register_forward_hook(lambda m, i, o, n=name: capture(m, i, o, n))
        for name, module in modules.items()
    ]
    generator = torch.Generator(device=x.device).manual_seed(seed)
    try:
        for start in tqdm(
            range(0, len(x), batch_size), desc="Laplace diag curvature", unit="batch", disable=not progress
        ):
            rows, _ = world.split(torch.arange(start, min(start + batch_size, len(x))))
            if not len(rows):  # a last batch smaller than the processes: this one has no part of it
                continue
            xb, part = x[rows.to(x.device)], (int(rows[0]) - start, min(batch_size, len(x) - start))
            if fisher == "mc":
                for _ in range(samples):
                    likelihood.sampled_nll(net(xb), generator, part).backward()
            else:
                out = net(xb)
                roots = torch.stack(
                    [loss_hessian_matrix_sqrt(o, o.new_zeros(1), loss) for o in out.detach().split(1)]
                ) * math.sqrt(scale)
                for c in range(roots.shape[-1]):
                    (out * roots[:, :, c]).sum().backward(retain_graph=c < roots.shape[-1] - 1)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if name not in store]
    if missing:  # every process had a part of the first batch (the caller checks len(x) >= world.size)
        raise RuntimeError(f"no curvature was summed for {missing}")
    world.sum([store[name] for name in modules])  # in one order on every process
    return {name: store[name].div_(samples if fisher == "mc" else 1) for name in modules}  # in place


def has_curvature(net: nn.Module, layer) -> bool:
    """Whether :func:`curvature` takes ``layer`` of ``net``: the weight of a Linear or Conv2d module."""
    return layer.kind == "weight" and isinstance(net.get_submodule(layer.name), (nn.Linear, nn.Conv2d))


def fit_subset(n: int, size: int | None, seed: int) -> torch.Tensor | None:
    """The indices of ``size`` of ``n`` training inputs drawn at random (seeded), which a curvature's sum over
    all ``n`` is estimated from (scaled by ``n / size``); None when all are used."""
    if size is None or size >= n:
        return None
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


def curvature(
    net: nn.Module,
    layers,
    x: torch.Tensor,
    structure: str = "kron",
    batch_size: int = 500,
    samples: int = 1,
    seed: int = 0,
    progress: bool = True,
    likelihood=None,
    fisher: str = "mc",
    kfac: str = "expand",
    ekfac: bool = False,
    world: World | None = None,
) -> dict:
    """The GGN of each layer of ``layers`` summed over ``x`` under ``likelihood`` (categorical by default; a
    Gaussian's noise held at a point): ``{layer: diagonal (R, K)}`` or ``{layer: (G (R, R), A (K, K))}`` with
    ``H ≈ G ⊗ A`` (float64).

    ``fisher="mc"`` estimates it by the Monte Carlo Fisher, ``samples`` targets drawn per input from the net's own
    predictive; ``"type-2"`` is the exact GGN (one backward pass per output). ``kfac`` is the convolutions'
    Kronecker factorisation, ``"expand"`` or ``"reduce"`` (Eschenhagen et al. 2023); ``ekfac`` adds, per layer,
    the eigenvalues refitted in the factors' eigenbasis (EKFAC, George et al. 2018; a second pass over ``x``):
    ``(G, A, (U_G, U_A, eigenvalues (R, K)))``, whose trace is the GGN block's. Given the ``world`` of a run of
    several processes, they share the diagonal's batches (:func:`_diagonal`; every process must call this); the
    KFAC factors are computed whole by each."""
    likelihood = Categorical() if likelihood is None else likelihood
    if structure not in STRUCTURES:
        raise PyrozooError(f"Laplace structure is one of {', '.join(STRUCTURES)}, not {structure!r}")
    if fisher not in FISHERS:
        raise PyrozooError(f"the Laplace curvature's fisher is one of {', '.join(FISHERS)}, not {fisher!r}")
    if kfac not in KFAC_APPROX:
        raise PyrozooError(
            f"the KFAC variant for convolutions is one of {', '.join(KFAC_APPROX)}, not {kfac!r}"
        )
    for layer in layers:
        if not has_curvature(net, layer):
            raise PyrozooError(
                f"Laplace supports Linear and Conv2d layers; {layer.name!r} ({layer.kind}) is neither"
            )
    modules = {layer.name: net.get_submodule(layer.name) for layer in layers}
    loss, scale = _loss(likelihood)
    training = net.training
    net.eval()  # no dropout: the curvature of the network as it predicts
    requires = {p: p.requires_grad for p in net.parameters()}
    for p in net.parameters():
        p.requires_grad_(True)
    try:
        with torch.no_grad():
            likelihood.check_output(net(x[:1]))
        if structure == "kron":
            return _kfac(
                net, modules, x, loss, scale, batch_size, samples, seed, progress, fisher, kfac, ekfac
            )
        world = World() if world is None else world
        if len(x) < world.size:
            raise PyrozooError(
                f"the curvature is fitted on {len(x)} inputs, fewer than the {world.size} processes that share "
                "them: fit it on at least one input per process"
            )
        return _diagonal(
            net, modules, x, likelihood, loss, scale, batch_size, samples, seed, progress, fisher, world
        )
    finally:
        for p, flag in requires.items():
            p.requires_grad_(flag)
        net.zero_grad(set_to_none=True)
        net.train(training)


START_FIT_SIZE = (
    2000  # training inputs a start's curvature is estimated from (as pyrozoo compress's --fit-size)
)


def start_curvature(model, guide, net: nn.Module, inputs: torch.Tensor, seed: int = 0) -> dict:
    """``{layer: H}``: the GGN diagonal of each Linear and Conv2d layer's ``[W | b]`` at the trained ``net``,
    summed over the training set ``inputs`` (estimated from :data:`START_FIT_SIZE` of them, scaled up), under
    ``model``'s likelihood at a point: the Monte Carlo Fisher of :func:`curvature`.

    ``start_from_weights(..., init_scale="laplace", curvature=...)`` (:mod:`pyrozoo.init_from`) starts each weight's
    latent ``z = w / scale`` at its diagonal Laplace scale ``(1 + scale^2 H)^-1/2``: the spread the data leave
    the trained weight, where a fixed small start (1e-3) keeps every weight far more certain than the data say,
    so BMR finds little to remove, and a large one (0.03) loses the trained net's accuracy at the first draws
    (issue 28's trial)."""
    layers = [layer for layer in model.layers if has_curvature(net, layer)]
    n = len(inputs)
    order = fit_subset(n, START_FIT_SIZE, seed)
    if order is not None:
        inputs = inputs[order.to(inputs.device)]
    likelihood = model.likelihood.at_point(guide)
    with torch.enable_grad():
        found = curvature(net, layers, inputs, "diag", seed=seed, progress=False, likelihood=likelihood)
    return {name: h * (n / len(inputs)) for name, h in found.items()}


def prior_precision(eigenvalues: torch.Tensor, squared_norm: float) -> float:
    """The prior precision δ maximising the Laplace marginal likelihood of one layer,
    ``-δ/2 |w*|² + n/2 ln δ - 1/2 Σ ln(h + δ)`` over the data precision's eigenvalues ``h``: the root of
    ``γ(δ) = δ |w*|²`` with ``γ = Σ h / (h + δ)`` the effective number of parameters (MacKay), by bisection in
    ``ln δ`` (``γ(δ) - δ |w*|²`` falls monotonically)."""
    h = _nonnegative(eigenvalues)
    buffer = torch.empty_like(
        h
    )  # one scratch tensor for every step of the bisection (a layer's size in float64)

    def excess(log_delta: float) -> float:
        delta = math.exp(log_delta)
        return float(torch.div(h, torch.add(h, delta, out=buffer), out=buffer).sum()) - delta * squared_norm

    lo, hi = -30.0, 30.0
    if excess(lo) <= 0:
        return math.exp(lo)
    if excess(hi) >= 0:
        return math.exp(hi)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return math.exp(0.5 * (lo + hi))


def noise_precision(
    eigenvalues: dict, squared_norms: dict, squared_error: float, n: int, precision: float
) -> float:
    """The Gaussian noise precision β maximising the Laplace evidence jointly with every layer's prior precision:
    MacKay's fixed point ``β = (n - γ) / Σ r²`` over the ``n`` training residuals ``r`` at the mean (summed
    squares ``squared_error``), ``γ = Σ_layers γ_l`` the effective number of parameters, each layer's δ by
    :func:`prior_precision` at the curvature of ``β`` (the GGN ``β J'J`` is linear in β). ``eigenvalues`` are
    each layer's data precision at the noise precision ``precision``."""
    h = {name: e.double().flatten().clamp(min=0) / precision for name, e in eigenvalues.items()}  # at β = 1
    squared_error = max(squared_error, 1e-300)
    beta = precision
    for _ in range(500):
        gamma = 0.0
        for name, unit in h.items():
            delta = prior_precision(unit * beta, squared_norms[name])
            gamma += float((unit * beta / (unit * beta + delta)).sum())
        new = max(n - gamma, 1e-12) / squared_error
        if abs(new - beta) <= 1e-10 * beta:
            return new
        beta = new
    return beta


def log_marginal_likelihood(eigenvalues: torch.Tensor, squared_norm: float, delta: float) -> float:
    """The δ-dependent part of a layer's Laplace log marginal likelihood (what :func:`prior_precision` maximises)."""
    h = _nonnegative(eigenvalues)
    return (
        -0.5 * delta * squared_norm
        + 0.5 * h.numel() * math.log(delta)
        - 0.5 * float((h + delta).log_().sum())
    )


def _nonnegative(eigenvalues: torch.Tensor) -> torch.Tensor:
    """The eigenvalues flattened, in float64, negative ones (rounding) at 0; without a copy when they are
    already so (a diagonal's squares are)."""
    h = eigenvalues.double().flatten()
    return h.clamp(min=0) if bool((h < 0).any()) else h


# --- the posterior ------------------------------------------------------------------------------------------


class LaplacePosterior(Posterior):
    """A Laplace posterior over the latents ``z`` of a model built by :func:`laplace` (``w = s z``).

    ``posterior()`` gives each entry's mean and *marginal* standard deviation; ``predictive`` says how
    :func:`pyrozoo.predict.predict` predicts with it: ``"glm"``, the linearised net at its draws (the default), or
    ``"samples"``, the net at its draws (:mod:`pyrozoo.posteriors.linearised`). Under KFAC (``kron`` given per
    site) the posterior is correlated: :meth:`reduce` writes back the mean conditioned on the pruned entries
    being 0, computed from the full posterior, and keeps which entries it pruned; a draw is then of that
    conditional Gaussian, the full posterior's draw conditioned the same way (Matheron's rule, one
    conjugate-gradient solve a layer and draw): its survivors' covariance ``P_TT^-1`` is not Kronecker, and is
    smaller than their marginal one, which masking a draw of the full posterior would give (and which left the
    linearised predictive of a pruned LeNet far too wide: experiments/RESULTS.md).
    """

    point_mass: ClassVar[bool] = False

    def __init__(self, model, loc: dict, scale: dict, kron: dict | None = None, predictive: str = "glm"):
        self._sites = [layer.site for layer in model.layers]
        # how pyrozoo.predict uses it (pyrozoo.posteriors.linearised): the linearised net, or the net at draws
        self.predictive = check_predictive(predictive)
        self.loc = {s: loc[s].clone() for s in self._sites}
        self.scale = {s: scale[s].clone() for s in self._sites}
        self.kron: dict[str, KroneckerGaussian] = dict(kron or {})
        self.pruned: dict[str, torch.Tensor] = {}  # per Kronecker site, the entries a reduction fixed at 0
        self.report: list[dict] = []  # the write-backs: site, pruned entries, CG residual and iterations

    @property
    def structure(self) -> str:
        return "kron" if self.kron else "diag"

    def sites(self) -> list[str]:
        return list(self._sites)

    def site_support(self, site: str) -> constraints.Constraint:
        return constraints.independent(constraints.real, 2)

    def site_posterior(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc[site], self.scale[site]

    def _write(self, site, loc, scale, where) -> None:
        self.loc[site] = loc.clone() if where is None else torch.where(where, loc, self.loc[site])
        self.scale[site] = scale.clone() if where is None else torch.where(where, scale, self.scale[site])

    @torch.no_grad()
    def reduce(self, site: str, pruned: torch.Tensor) -> None:
        """Point-mass reduction of the entries ``pruned`` of ``site``: pruned entries get the prior; under KFAC
        the survivors move to the reduced posterior mean (the full posterior conditioned on the pruned being 0).
        """
        if site in self.kron and bool(pruned.any()):
            mean, residual, iterations = self.kron[site].conditional_mean(pruned)
            self.loc[site] = mean.to(self.loc[site])
            self.pruned[site] = pruned.bool().clone()  # every pruned entry of the site: draws are conditioned
            self.report.append(
                {
                    "site": site,
                    "pruned": int(pruned.sum()),
                    "cg_residual": residual,
                    "cg_iterations": iterations,
                }
            )
        super().reduce(site, pruned)

    @contextlib.contextmanager
    def compensating(self, model):
        """Within: each Kronecker site's mean is the reduced posterior mean given the inputs (whole columns) that
        ``model``'s masks remove: the surviving columns compensate for the removed ones as far as the posterior's
        correlations say (Optimal Brain Surgeon's update, the prior included), so that a rebuilt net starts
        nearer the dense one's function. Rows a mask removes are not conditioned on: a removed unit's producing
        rows make a value whose readers, its consumers' columns, are gone with it. The means are put back after.
        """
        saved = {}
        for layer in model.layers:
            if layer.site not in self.kron:
                continue
            columns = (model.mask(layer.name) == 0).all(dim=0)
            if bool(columns.any()):
                saved[layer.site] = self.loc[layer.site]
                pruned = columns.expand(self.loc[layer.site].shape)
                mean = self.kron[layer.site].conditional_mean(pruned)[0]
                self.loc[layer.site] = mean.to(saved[layer.site])
        try:
            yield self
        finally:
            self.loc.update(saved)

    def __call__(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Sample every latent (the model's arguments are accepted and ignored)."""
        out = {}
        for site in self._sites:
            loc = self.loc[site]
            if site in self.kron:
                k = self.kron[site]
                g, u_g, a, u_a, D = k._eig
                eps = torch.randn(loc.shape, dtype=torch.float64, device=loc.device)
                offset = u_g @ (D.sqrt() * eps) @ u_a.T
                # of the reduced posterior: the draw conditioned on the pruned entries being 0
                if site in self.pruned:
                    offset = k.conditional_mean(self.pruned[site], of=offset)[0]
                value = loc + offset.to(loc)
                out[site] = pyro.sample(site, dist.Delta(value, event_dim=2))
            else:
                out[site] = pyro.sample(site, dist.Normal(loc, self.scale[site]).to_event(2))
        return out

    def state_dict(self) -> dict:
        return {"loc": self.loc, "scale": self.scale, "pruned": self.pruned}

    def load_state_dict(self, state: dict) -> None:
        self.loc = {s: v.clone() for s, v in state["loc"].items()}
        self.scale = {s: v.clone() for s, v in state["scale"].items()}
        self.pruned = {s: v.clone() for s, v in state.get("pruned", {}).items()}


@torch.no_grad()
def laplace(
    net: nn.Module,
    x: torch.Tensor,
    structure: str = "kron",
    output: str | None = None,
    batch_size: int = 500,
    samples: int = 1,
    seed: int = 0,
    likelihood=None,
    progress: bool = True,
    fit_size: int | None = None,
    fisher: str = "mc",
    kfac: str = "expand",
    ekfac: bool = False,
    y: torch.Tensor | None = None,
    predictive: str = "glm",
    world: World | None = None,
) -> tuple[BayesianModel, LaplacePosterior]:
    """A Laplace approximation around ``net``'s own weights, fitted on the training inputs ``x``.

    Returns ``(model, posterior)``: a :class:`~pyrozoo.models.BayesianModel` of a copy of ``net`` (``net`` is
    not changed) whose prior is the Gaussian chosen by the marginal likelihood, one scale per layer, and its
    :class:`LaplacePosterior`, diagonal (``structure="diag"``) or KFAC (``"kron"``); every reduction, rebuild and
    evaluation of pyrozoo takes them. ``model.laplace`` records each layer's prior precision and the evidence.
    ``fit_size`` estimates the curvature's sum over ``x`` from that many inputs drawn at random (scaled by
    ``len(x) / fit_size``), for a large training set on a small machine. ``likelihood`` is the observation model
    the curvature is taken under and the returned model keeps: categorical by default; for a regressor
    ``Gaussian("fixed", precision)`` (pyrozoo.models.likelihoods), the noise precision of the targets it was
    fitted to; with its training targets ``y`` (standardised as ``x``'s net predicts them) the noise precision is
    chosen by the evidence with the prior precisions (:func:`noise_precision`), and the model keeps that one.
    ``fisher``, ``kfac`` and ``ekfac`` choose the curvature (:func:`curvature`); ``predictive`` how
    :func:`pyrozoo.predict.predict` uses the posterior (:class:`LaplacePosterior`). In a run of several
    processes, every one calls this with its ``world``: they share the diagonal curvature's batches and all get
    the same posterior.
    """
    check_predictive(predictive)
    net = copy.deepcopy(net)
    layers = find_layers(net, output)
    n = len(x)
    order = fit_subset(n, fit_size, seed)
    if order is not None:
        x = x[order.to(x.device)]
        y = None if y is None else y[order.to(y.device)]
    with torch.enable_grad():
        # fmt: off
        curv = curvature(
            net, layers, x, structure, batch_size, samples, seed, progress, likelihood, fisher, kfac, ekfac, world
        )
        # fmt: on
    curv = {k: _scaled(curv.pop(k), n / len(x)) for k in list(curv)}  # each layer's old copy freed as it goes
    by_name = {layer.name: layer for layer in layers}
    norms = {layer.name: float(layer.join(net).double().square().sum()) for layer in layers}

    def weights(name):  # made when read, not held: a large layer's float64 copy is hundreds of MB
        return by_name[name].join(net).double()

    def eigenvalues_of(name):
        return _gaussian(weights(name), curv[name]).eigenvalues() if structure == "kron" else curv[name]

    if y is not None and isinstance(likelihood, Gaussian):
        error = _squared_error(net, x, y, batch_size) * n / len(x)
        eigenvalues = {k: eigenvalues_of(k) for k in curv}
        likelihood = _evidence_noise(likelihood, curv, eigenvalues, norms, error, n).to(x.device)
    scales, loc, scale, kron, record = _layer_fits(layers, curv, eigenvalues_of, weights, norms, structure)
    kwargs = {} if likelihood is None else {"likelihood": likelihood}
    # the example batch traces the net's units (for a units pass and the rebuild) at the inputs' own size
    model = BayesianModel(net, prior=FixedScales(scales), output=output, example_input=x[:2], **kwargs)
    model.laplace = record
    return model, LaplacePosterior(model, loc, scale, kron, predictive)


def _layer_fits(layers, curv: dict, eigenvalues_of, weights, norms: dict, structure: str) -> tuple:
    """Every layer's :func:`_layer_posterior`, each layer's curvature popped from ``curv`` as it is read (its
    float64 copy goes with it): ``(scales, loc, scale, kron, record)`` by layer name or site."""
    scales, loc, scale, kron, record = {}, {}, {}, {}, []
    for layer in layers:
        eigenvalues = eigenvalues_of(layer.name)
        factors = curv.pop(layer.name)
        site = layer.site
        fit = _layer_posterior(
            weights(layer.name),
            eigenvalues,
            factors if structure == "kron" else None,
            norms[layer.name],
            layer.dtype,
        )
        scales[layer.name], loc[site], scale[site], gaussian, evidence = fit
        if gaussian is not None:
            kron[site] = gaussian
        record.append({"layer": layer.name, **evidence})
    return scales, loc, scale, kron, record


def _layer_posterior(w, eigenvalues, kron_factors: tuple | None, squared_norm: float, dtype: torch.dtype):
    """One layer's Laplace fit in the latent frame ``z = w / s`` (float64 ``w``): ``(s, loc, marginal scale,
    KFAC Gaussian or None, its record of the evidence)`` with loc and scale in ``dtype``, the prior precision
    ``δ = s^-2`` chosen by the evidence (:func:`prior_precision`); ``kron_factors`` the layer's KFAC curvature,
    or None for the diagonal ``eigenvalues``."""
    delta = prior_precision(eigenvalues, squared_norm)
    s = delta**-0.5
    gaussian = None
    if kron_factors is not None:
        gaussian = _gaussian(w / s, _scaled(kron_factors, 1 / delta))
        variance = gaussian.marginal_variance()
    else:  # 1 / (h / delta + 1), in place
        variance = (eigenvalues / delta).add_(1).reciprocal_()
    evidence = {
        "prior_precision": delta,
        "prior_scale": s,
        "log_marginal": log_marginal_likelihood(eigenvalues, squared_norm, delta),
    }
    return s, (w / s).to(dtype), variance.sqrt_().to(dtype), gaussian, evidence


def _evidence_noise(likelihood, curv: dict, eigenvalues: dict, norms: dict, error: float, n: int) -> Gaussian:
    """The Gaussian likelihood with its noise precision chosen by the evidence (:func:`noise_precision`), and
    the curvature ``curv`` (taken under ``likelihood``'s precision) rescaled to it in place: the GGN is linear
    in the precision."""
    before = float(likelihood.precision())
    beta = noise_precision(eigenvalues, norms, error, n, before)
    for k in list(curv):
        curv[k] = _scaled(curv.pop(k), beta / before)
    return Gaussian("fixed", beta)


@torch.no_grad()
def _squared_error(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    """``Σ (y - f(x))²`` of a one-output regressor, in eval mode (no dropout)."""
    training = net.training
    net.eval()
    try:
        batches = ((x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size))
        return sum(float((net(xb).double().reshape(-1) - yb.double()).square().sum()) for xb, yb in batches)
    finally:
        net.train(training)


NOISES = ("evidence", "run")  # a regression's noise: chosen by the Laplace evidence, or the run's own


def laplace_from_run(run, structure: str = "kron", progress: bool = True, noise: str = "evidence", **options):
    """:func:`laplace` around a run's point estimate (posterior mean; a ``flat-map`` run's MAP weights), fitted
    on its training inputs; a regression run's noise precision chosen by the Laplace evidence from its training
    targets (``noise="evidence"``), or held at the run's own (``"run"``: its posterior mean, or its learned or
    fixed value)."""
    if noise not in NOISES:
        raise PyrozooError(f"a Laplace fit's noise is one of {', '.join(NOISES)}, not {noise!r}")
    net = rebuild(run.model, run.guide, remove_dead=False)
    output = next(layer.name for layer in run.model.layers if layer.is_output)
    regress = run.data.task == "regress"
    return laplace(
        net,
        run.data.x_train,
        structure,
        output=output,
        likelihood=run.point_likelihood(),
        progress=progress,
        seed=run.config.seed,
        y=run.data.y_train if regress and noise == "evidence" else None,
        **options,
    )
