"""IVON's posterior behind the posterior contract, and its training step.

IVON (Shen et al., ICML 2024, "Variational learning is effective for large deep networks") trains a plain
network with an Adam-like step and keeps, as a by-product, a diagonal Gaussian posterior ``N(m, 1 / (ess (h +
delta)))`` over the weights: ``m`` the weights themselves, ``h`` its running Hessian estimate, ``ess`` the
effective sample size (the training set's size) and ``delta`` the weight decay, which is its Gaussian prior
``N(0, 1 / (ess delta))``. The optimiser is the authors' (``ivon-opt``) with its per-step arithmetic done in
place (pyrozoo.optim.IVONOptimizer, which says why) and its step counter added to its ``state_dict`` (debiasing
reads it, so a resumed run must continue it).

The frame. pyrozoo's models are non-centred: ``w = scale * mask * z``, ``z ~ N(0, 1)``. With the fixed prior
``gaussian`` (no hyperparameters) a layer's scale ``s`` is a constant, and IVON's weight decay for that layer is
set to ``delta = 1 / (ess s^2)``: IVON's prior is then exactly the model's, and the posterior in ``z`` is
``N(m / s, 1 / (ess h s^2 + 1))`` (variance), since ``ess (h + delta) s^2 = ess h s^2 + 1``. BMR's closed forms
(pyrozoo.bmr.delta_f) take it as they take any mean-field posterior in ``z`` against ``N(0, 1)``; no form of
its own is needed (tests/guides/test_ivon.py checks dF against the exact evidence of a conjugate linear regression).
A pruned entry is reset to the prior: weight 0, Hessian 0 (precision ``ess delta``, scale 1 in ``z``) and
momentum 0, a fixed point of IVON's update, and the net multiplies it by its mask, so it never comes back.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.distributions import constraints

from pyrozoo.errors import PyrozooError
from pyrozoo.guides.base import Posterior, moved_fraction
from pyrozoo.optim import IVONOptimizer

# why an IVON run cannot learn a regression's noise, said wherever it is asked to
NOISE_WHY_NOT = (
    "IVON cannot learn the noise: its step is a natural-gradient update of the weights' Gaussian posterior, whose "
    "prior is its weight decay, and a noise precision is no such weight: give --noise fixed --noise-precision P, "
    "or let the Laplace evidence choose it after training (pyrozoo predict RUN --posterior laplace-kfac)"
)


class IVONPosterior(Posterior, nn.Module):
    """IVON's diagonal Gaussian posterior over a model's weights, in the model's ``z`` frame.

    The model's prior must be fixed (no hyperparameter latents, e.g. ``gaussian``): it is IVON's weight decay.
    The weights start at the net's own initialisation (a plain network's training) and the Hessian at
    ``hess_init``. :meth:`make_optimizer` builds the IVON optimiser over them; :func:`ivon_step` trains.

    :param ess: effective sample size; None: the training set's size, set by :meth:`make_optimizer` (a guide
        built without data and without ``ess`` uses 1 until then).
    :param hess_init: IVON's initial Hessian (its initial posterior precision is ``ess (hess_init + delta)``).
    :param beta1: IVON's momentum of the gradient.
    :param beta2: IVON's momentum of the Hessian. 0.999, not ivon-opt's 0.99999: BMR passes read the Hessian
        after a few hundred steps, and with 0.99999 it would still be ``hess_init`` (it moves by 1e-5 a step);
        on the MLP, 4 epochs with 0.999 reached 0.83 accuracy at 98% pruned (experiments/RESULTS.md, IVON as a
        posterior source).
    :param mc_samples: weight samples per training step (IVON's own Monte Carlo).
    :param clip_radius: IVON's clipping of the preconditioned step (inf: none).
    :param kernel: ``"eager"`` (ivon-opt's noise, torch's ``randn``) or ``"compiled"``: the draw and the update
        each one loop compiled by ``torch.compile`` on the CPU, the noise from a counter-based generator
        (:class:`pyrozoo.optim.IVONOptimizer`; compiled on each process's first step: about 40 s cold, 12 s from
        torch's disk cache, on a 2-core CPU).
    """

    fixed_prior = True

    def __init__(
        self,
        model,
        ess: float | None = None,
        hess_init: float = 0.1,
        beta1: float = 0.9,
        beta2: float = 0.999,
        mc_samples: int = 1,
        clip_radius: float = math.inf,
        kernel: str = "eager",
    ):
        super().__init__()
        for name, value in (
            ("hess_init", hess_init),
            ("mc_samples", mc_samples),
            ("clip_radius", clip_radius),
        ):
            if not value > 0:
                raise PyrozooError(f"guide 'ivon': {name} must be positive, got {value}")
        if kernel not in IVONOptimizer.KERNELS:
            raise PyrozooError(
                f"guide 'ivon': kernel must be one of {', '.join(IVONOptimizer.KERNELS)}, got {kernel!r}"
            )
        if ess is not None and not ess > 0:
            raise PyrozooError(f"guide 'ivon': ess must be positive, got {ess}")
        if not (0 <= beta1 < 1 and 0 <= beta2 <= 1):
            raise PyrozooError(
                f"guide 'ivon': beta1 must lie in [0, 1) and beta2 in [0, 1], got {beta1}, {beta2}"
            )
        with poutine.block():
            prototype = poutine.trace(model.sample_weights).get_trace()
        layers = model.layers
        hyper = [n for n, _ in prototype.iter_stochastic_nodes() if n not in {layer.site for layer in layers}]
        if getattr(model.likelihood, "noise", "fixed") != "fixed":
            raise PyrozooError(NOISE_WHY_NOT)
        if hyper:
            raise PyrozooError(
                f"guide 'ivon' needs a fixed prior, its weight decay; this model's prior has hyperparameters "
                f"({', '.join(hyper[:3])}): use --prior gaussian (method ivon-bmr does), and in regression "
                "--noise fixed"
            )
        self.options = dict(hess_init=hess_init, beta1=beta1, beta2=beta2, mc_samples=mc_samples)
        self.options.update(clip_radius=clip_radius, kernel=kernel)
        self.register_buffer("ess", torch.tensor(float(ess or 1.0), dtype=torch.float64))
        self.register_buffer("kl", torch.zeros((), dtype=torch.float64))  # the reported loss's KL term
        self.weights = nn.ParameterDict()
        self.hess = nn.Module()
        self._sites: dict[str, tuple[str, object]] = {}  # site -> (key, layer)
        for layer in layers:
            key = layer.name.replace(".", "-")
            with poutine.block():
                scale = torch.as_tensor(model.prior(layer)).detach()
            self.weights[key] = nn.Parameter(layer.join(model.net).clone())
            self.hess.register_buffer(key, torch.full(layer.shape, float(hess_init), dtype=layer.dtype))
            self.register_buffer(f"prior_scale_{key}", scale.to(layer.dtype).expand(layer.shape).clone())
            self._sites[layer.site] = (key, layer)
        self.optimizer: IVONOptimizer | None = None
        self._ess_given = ess is not None
        self.register_load_state_dict_post_hook(lambda module, _: module._push_state())

    # --- the optimiser --------------------------------------------------------------------------------------

    def make_optimizer(self, lr: float, dataset_size: int) -> IVONOptimizer:
        """IVON over the weights, one parameter group per layer with weight decay ``1 / (ess s^2)`` (``s`` the
        layer's prior scale, one value per layer), and this posterior's Hessian as its starting state."""
        if not self._ess_given:
            self.ess.fill_(float(dataset_size))
        ess = float(self.ess)
        groups = []
        for _, (key, _layer) in self._sites.items():
            scale = getattr(self, f"prior_scale_{key}")
            if not bool((scale == scale.flatten()[0]).all()):
                raise PyrozooError(
                    "guide 'ivon': IVON's weight decay is one number per layer; this prior's varies"
                )
            groups.append(
                {"params": [self.weights[key]], "weight_decay": 1.0 / (ess * float(scale.flatten()[0]) ** 2)}
            )
        o = self.options
        self.optimizer = IVONOptimizer(
            groups,
            lr=lr,
            ess=ess,
            hess_init=o["hess_init"],
            beta1=o["beta1"],
            beta2=o["beta2"],
            mc_samples=o["mc_samples"],
            clip_radius=o["clip_radius"],
            kernel=o["kernel"],
        )
        self._push_state()
        return self.optimizer

    def _groups(self):
        return zip(self.optimizer.param_groups, self._sites.values())

    @torch.no_grad()
    def resize(self, resize_site) -> dict[nn.Parameter, tuple[nn.Parameter, str]]:
        """Compaction (:mod:`pyrozoo.bmr.compact`): each layer's weights, Hessian and prior scale, and with an
        optimiser its group's Hessian, momentum and size, become ``resize_site(site, tensor, fill)`` (new entries,
        when growing, at the prior: weight 0, Hessian 0, momentum 0); returns ``{old parameter: (new parameter,
        site)}`` for those that changed."""
        groups = {key: group for group, (key, _) in self._groups()} if self.optimizer is not None else {}
        moved = {}
        for site, (key, _layer) in self._sites.items():
            old = self.weights[key]
            weights = resize_site(site, old.detach(), 0.0)
            if weights.shape == old.shape:
                continue
            scale = getattr(self, f"prior_scale_{key}")
            self.register_buffer(
                f"prior_scale_{key}", resize_site(site, scale, float(scale.flatten()[0])).clone()
            )
            self.weights[key] = nn.Parameter(weights.contiguous().clone())
            moved[old] = (self.weights[key], site)
            group = groups.get(key)
            if group is None:
                self.hess.register_buffer(
                    key, resize_site(site, getattr(self.hess, key), 0.0).contiguous().clone()
                )
                continue
            # the optimiser's own state, of which the posterior's Hessian is a view
            for state in ("hess", "momentum"):
                group[state] = resize_site(site, group[state].view(old.shape), 0.0).flatten().clone()
            group["params"], group["numel"] = [self.weights[key]], weights.numel()
            self.hess.register_buffer(key, group["hess"].view(weights.shape))
        if self.optimizer is not None:
            self.optimizer._numel = sum(group["numel"] for group in self.optimizer.param_groups)
        return moved

    @torch.no_grad()
    def _push_state(self) -> None:
        """The optimiser's Hessian from this posterior's (after a write or a load)."""
        if self.optimizer is None:
            return
        for group, (key, _) in self._groups():
            group["hess"] = getattr(self.hess, key).flatten().clone()

    @torch.no_grad()
    def pull_state(self) -> None:
        """This posterior's Hessian from the optimiser's (after a step): a view of the optimiser's tensor, which
        its update changes in place, rather than a copy (a pass over every weight saved per step); a write
        (:meth:`_write`) gives the optimiser a copy again."""
        for group, (key, _) in self._groups():
            self.hess.register_buffer(key, group["hess"].view(getattr(self.hess, key).shape))

    @torch.no_grad()
    def kl_divergence(self, model) -> float:
        """``KL(q || prior)`` summed over the live weights: in ``z``, ``1/2 (v + mu^2 - 1 - ln v)`` per entry with
        ``v = 1 / (ess h s^2 + 1)``."""
        total = 0.0
        for site, (key, layer) in self._sites.items():
            loc, scale = self._z(site)
            variance = scale.square()
            kl = 0.5 * (variance + loc.square() - 1 - variance.log())
            total += float((kl * model.mask(layer.name)).sum())
        return total

    def masked_weights(self, model) -> dict[str, torch.Tensor]:
        """``{layer: weights * mask}``, the net's parameters as the model multiplies them (a layer with nothing
        pruned skips the product, a multiplication by 1, and its backward pass)."""
        return {
            layer.name: (
                self.weights[key] * model.mask(layer.name)
                if model.has_pruned(layer.name)
                else self.weights[key]
            )
            for key, layer in self._sites.values()
        }

    def moved(self, model) -> tuple[float, str]:
        """The fraction of the live prunable weights whose Hessian moved by half its start, ``hess_init``: until
        then the posterior's spread is IVON's start, not the data's, and BMR would read a posterior near its
        start (with beta2 0.999, about 700 steps for weights of little curvature)."""
        start = self.options["hess_init"]
        values = {site: getattr(self.hess, key) for site, (key, _) in self._sites.items()}
        return (
            moved_fraction(model, values, start),
            f"IVON's Hessian moved by half its start (hess_init {start:g})",
        )

    def forced_pass_warning(self, steps: int) -> str | None:
        """IVON's Hessian is a running average: its start weighs ``beta2 ** steps`` after ``steps`` steps."""
        return _forced_pass_warning(self.options["beta2"], steps)

    # --- the posterior contract -----------------------------------------------------------------------------

    def _z(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        key, _ = self._sites[site]
        s = getattr(self, f"prior_scale_{key}")
        precision = self.ess.to(s.dtype) * getattr(self.hess, key) * s.square() + 1  # ess (h + delta) s^2
        return self.weights[key] / s, precision.rsqrt()

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Sample every weight latent (the model's arguments are accepted and ignored): IVON's
        ``sampled_params`` draw ``m + noise / sqrt(ess (h + delta))``, here in the ``z`` frame."""
        out = {}
        for site in self._sites:
            loc, scale = self._z(site)
            out[site] = pyro.sample(site, dist.Normal(loc, scale).to_event(2))
        return out

    def sites(self) -> list[str]:
        return list(self._sites)

    def site_support(self, site: str) -> constraints.Constraint:
        return constraints.independent(constraints.real, 2)

    def site_posterior(self, site: str) -> tuple[torch.Tensor, torch.Tensor]:
        loc, scale = self._z(site)
        return loc.detach(), scale.detach()

    @torch.no_grad()
    def _write(self, site, loc, scale, where) -> None:
        key, _ = self._sites[site]
        s = getattr(self, f"prior_scale_{key}")
        hess = getattr(self.hess, key)
        weights = loc * s
        new_hess = (scale.pow(-2) - 1) / (self.ess.to(s.dtype) * s.square())
        if where is not None:  # entries outside where keep their stored values bit for bit
            weights = torch.where(where, weights, self.weights[key])
            new_hess = torch.where(where, new_hess, hess)
        self.weights[key].copy_(weights)
        hess.copy_(new_hess)
        if self.optimizer is not None:  # a written entry starts afresh: no momentum from its old state
            for group, (group_key, _) in self._groups():
                if group_key == key:
                    group["hess"] = hess.flatten().clone()
                    momentum = group["momentum"].view_as(hess)
                    momentum.masked_fill_(
                        torch.ones_like(hess, dtype=torch.bool) if where is None else where, 0
                    )


KL_EVERY = 50  # steps between refreshes of the KL term of the reported loss (a full pass over the weights)


def _forced_pass_warning(beta2: float, steps: int) -> str | None:
    """The warning for a first BMR pass forced after ``steps`` steps, when the Hessian's start ``hess_init``
    still weighs more than 75% (None otherwise): such a pass may prune most weights."""
    initial = beta2**steps
    if initial <= 0.75:
        return None
    return (
        f"warning: after {steps} warm-up steps IVON's Hessian is still {initial:.0%} its initial "
        f"value (beta2 {beta2}): the first BMR pass reads a posterior near its start and may prune most "
        "weights (a pass that collapses the net is undone); raise --warmup-steps, or leave it out and BMR "
        "waits for the Hessian to move"
    )


def ivon_step(model, guide: IVONPosterior, optimizer: IVONOptimizer, x, y, dataset_size: int) -> float:
    """One IVON step on the plain net (weights times masks): ``mc_samples`` draws of the weights from IVON's
    posterior, the mean negative log-likelihood of the batch at each, one update. Returns ``-ELBO``'s estimate,
    ``N * nll + KL(q || prior)``, on the scale of SVI's loss; the KL term, which IVON's step does not need, is
    recomputed every ``KL_EVERY`` steps (it moves slowly) and kept in the guide's state, so a resumed run
    reports what an uninterrupted one does."""
    if getattr(optimizer, "kernel", "eager") == "compiled" and optimizer.mc_samples == 1:  # (ivon-opt's: none)
        total = _step_apart(model, guide, optimizer, x, y)
    else:
        total = _step_sampled(model, guide, optimizer, x, y)
    if optimizer.current_step % KL_EVERY == 0:
        guide.kl.fill_(guide.kl_divergence(model))
    optimizer.step()
    guide.pull_state()
    return dataset_size * total / optimizer.mc_samples + float(guide.kl)


def _step_sampled(model, guide: IVONPosterior, optimizer: IVONOptimizer, x, y) -> float:
    """ivon-opt's protocol: the weights drawn in place of the means, each draw's gradient collected; the summed
    negative log-likelihoods."""
    total = 0.0
    for _ in range(optimizer.mc_samples):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad(set_to_none=True)
            nll = -model.likelihood.log_likelihood(model.logits(x, guide.masked_weights(model)), y).mean()
            nll.backward()
        total += nll.item()
    return total


def _step_apart(model, guide: IVONPosterior, optimizer: IVONOptimizer, x, y) -> float:
    """One draw by the compiled kernels, each layer's weight and bias drawn apart into the tensors the net takes
    (:meth:`IVONOptimizer.draw_apart`; a transposed layer's, or one without a bias, as its latent, split as
    usual): the negative log-likelihood."""
    current = {layer.name: layer for layer in model.layers}  # as compaction leaves them
    layers = [current[layer.name] for _, layer in guide._sites.values()]
    columns = [layer.fan_in if layer.has_bias and not layer.transposed else None for layer in layers]
    params = {}
    for layer, parts in zip(layers, optimizer.draw_apart(columns)):
        pruned = model.has_pruned(layer.name)
        if len(parts) == 1:
            params.update(layer.split(parts[0] * model.mask(layer.name) if pruned else parts[0]))
            continue
        weight, bias = parts
        if pruned:  # the latent's mask, cut as the latent is
            mask = model.mask(layer.name)
            weight, bias = weight * mask[:, :-1], bias * mask[:, -1]
        params[layer.weight_name], params[layer.bias_name] = weight.view(layer.weight_shape), bias
    nll = -model.likelihood.log_likelihood(model.logits_of_params(x, params), y).mean()
    nll.backward()
    optimizer.collect_apart()
    return nll.item()
