"""Start a posterior from a trained network's weights, for any prior and any guide.

A trained net's weights ``w`` become the posterior means of the non-centred latents ``z = w / scale``, where
``scale`` is the layer's prior scale (``w = scale * mask * z``, pyrozoo.models.priors). The prior's
hyperparameters (a flat prior's layer precision, a horseshoe's global and per-row pairs, ...) are first set to
their most probable values given the trained weights (MAP in unconstrained space, a few hundred Adam steps on
``ln p(w | h) + ln p(h)``), so that ``z`` is on the prior's own scale rather than on whatever the guide's random
initialisation says; then ``z``'s locs are ``w`` divided by the scale at the posterior mean of the
hyperparameters. That is what ``rebuild`` and the predictions at the posterior mean read, so the net's outputs
there are the trained net's. Every scale starts at ``init_scale``: a number, or (a run's default) ``"laplace"``,
each weight's diagonal Laplace scale on the training data (:func:`start_from_weights`).

The MAP step works for any prior function, since it only evaluates the prior's log density (through Pyro's
trace); no prior needs code of its own.
"""

from __future__ import annotations

import collections
import copy
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from pyro import poutine
from torch import nn
from torch.distributions import biject_to

from pyrozoo.errors import PyrozooError, reason
from pyrozoo.torchfile import load_tensors


def load_state(path: str | os.PathLike, trust_pickle: bool = False, flag: str = "--init-from") -> dict:
    """The weights in ``path``: a ``state_dict`` of the net (``torch.save(net.state_dict(), path)``) or a
    ``{"state_dict": ...}`` wrapper; a whole saved ``nn.Module`` (``pyrozoo export``'s ``sparse_net.pt``) only
    with ``trust_pickle``, since opening one runs whatever code the file holds. ``flag`` names the file in
    messages."""
    path = Path(path)
    what = f"{flag} {path}"
    weights_of_a_run = (
        "for a pyrozoo run, `pyrozoo export RUN --pruned none` writes them to export/sparse_state_dict.pt"
    )
    if path.is_dir():
        raise PyrozooError(f"{what}: a folder, not a file of weights; {weights_of_a_run}")
    if not path.is_file():
        raise PyrozooError(f"{what}: no such file")
    fix = (
        "if you made it yourself (a net saved whole, or pyrozoo export's sparse_net.pt), pass --trust-pickle; "
        "or save the net's weights with torch.save(net.state_dict(), path) and pass that file"
    )
    try:
        obj = load_tensors(path, what=what, fix=fix, trust_pickle=trust_pickle)
    except PyrozooError:
        raise
    except Exception as e:  # a truncated zip, a bad pickle, random bytes, a torch.export program: many kinds
        raise PyrozooError(
            f"{what}: not a file of weights saved by torch.save ({reason(e).split('. ')[0]}); save them with "
            f"torch.save(net.state_dict(), path), or {weights_of_a_run}"
        ) from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PyrozooError(
            f"{what}: holds neither a state_dict of tensors nor an nn.Module (found {type(obj).__name__}; a "
            f"checkpoint.pt holds a run's whole state; {weights_of_a_run})"
        )
    return obj


def trained_net(net: nn.Module, weights: dict[str, torch.Tensor] | nn.Module, what: str = "the weights"):
    """A copy of ``net`` holding ``weights`` (a state_dict or a module of the same architecture); a state that
    does not fit is one PyrozooError naming the first mismatch. Names may differ where the tensors are the same,
    in the same order and of the same shapes (a net built with dropout, whose ``nn.Sequential`` indices shift).
    """
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    same_shapes = len(state) == len(own) and all(
        tuple(a.shape) == tuple(b.shape) for a, b in zip(state.values(), own.values())
    )
    if (missing or unexpected) and same_shapes:
        # the same tensors in the same order under other names: the net was built with parameter-free modules
        # in between (flat-map's dropout shifts an nn.Sequential's indices), so it is the same architecture
        state = dict(zip(own, state.values()))
        missing = unexpected = []
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''}")
        raise PyrozooError(f"{what} does not fit the net {type(net).__name__}: {'; '.join(parts)}")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise PyrozooError(
                f"{what} does not fit the net {type(net).__name__}: {key} has shape "
                f"{tuple(state[key].shape)} there, {tuple(value.shape)} in the net (a net with units removed "
                "cannot start a dense one; give the net options it was trained with)"
            )
    copied = copy.deepcopy(net)
    loaded = collections.OrderedDict((k, v.to(own[k])) for k, v in state.items())
    loaded._metadata = own._metadata  # module versions: MNASNet refuses a state without them
    copied.load_state_dict(loaded)
    return copied


def hyper_sites(model, guide) -> list[str]:
    weight_sites = {layer.site for layer in model.layers}
    return [site for site in guide.sites() if site not in weight_sites]


def layer_scale(model, layer, hyper: dict[str, torch.Tensor]) -> torch.Tensor:
    """The layer's prior scale (broadcastable to its latent) at the hyperparameter values ``hyper``."""
    with poutine.block():
        return torch.as_tensor(poutine.condition(model.prior, data=hyper)(layer))


def fit_hyperparameters(model, guide, weights: dict[str, torch.Tensor], steps: int = 300, lr: float = 0.05):
    """MAP of the prior's hyperparameters given the layers' weights ``{layer: w}``: ``{site: unconstrained}``.

    Maximises ``sum_layers ln N(w; 0, scale(h)^2) + ln p(h)`` (a likelihood latent, such as the noise
    precision, by its prior alone) in unconstrained space (with the log-Jacobian of
    the map onto each support, so that densities diverging at a boundary, as Gamma(1/2) does at 0, have a
    finite maximum), starting from the guide's locs."""
    sites = hyper_sites(model, guide)
    if not sites:
        return {}
    posterior = guide.posterior()
    free = {s: posterior[s][0].clone().requires_grad_(True) for s in sites}
    transforms = {s: biject_to(guide.site_support(s)) for s in sites}
    optimizer = torch.optim.Adam(free.values(), lr=lr)
    # a layer-wide scale needs only the weights' count and sum of squares: 300 passes over a ResNet-18's 11M
    # weights would take minutes
    squares = {
        name: (len(v.reshape(-1)), v.double().square().sum().to(v.dtype)) for name, v in weights.items()
    }

    def gaussian(layer, scale):
        if scale.numel() == 1:
            count, sum_squares = squares[layer.name]
            scale = scale.reshape(())
            return -0.5 * sum_squares / scale.square() - count * (scale.log() + 0.5 * math.log(2 * math.pi))
        w = weights[layer.name]
        return torch.distributions.Normal(0.0, scale.expand_as(w)).log_prob(w).sum()

    like = model.mask(model.layers[0].name)

    def objective():
        values = {s: transforms[s](free[s]) for s in sites}
        total = sum(transforms[s].log_abs_det_jacobian(free[s], values[s]).sum() for s in sites)
        # the likelihood's own latents (a regression's noise precision) by their prior: the Jacobian alone
        # pushed a noise precision up without bound (1.6e6 after the 300 steps, toy1d flat-map --start net)
        with poutine.block(), poutine.trace() as tape:
            poutine.condition(model.likelihood.sample_latents, data=values)(like)
        total = total + tape.trace.log_prob_sum()
        for layer in model.layers:
            with poutine.block(), poutine.trace() as tape:
                scale = torch.as_tensor(poutine.condition(model.prior, data=values)(layer))
            trace = tape.trace
            total = total + trace.log_prob_sum()
            total = total + gaussian(layer, scale)
        return -total

    with torch.enable_grad():
        for _ in range(steps):
            loss = objective()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {s: v.detach() for s, v in free.items()}


# init_scale="laplace": a trained net's posterior starts at the spread the data leave its weights
LAPLACE = "laplace"
LAPLACE_FALLBACK = 1e-3  # the start scale of the layers no curvature is taken for (only Linear and Conv2d)


@torch.no_grad()
def start_from_weights(
    model,
    guide,
    weights: dict[str, torch.Tensor] | nn.Module,
    init_scale: float | str | None = 1e-3,
    what="the weights",
    steps: int = 300,
    curvature: Callable[[nn.Module], dict] | None = None,
) -> None:
    """Set ``guide``'s posterior so that its mean is the trained net ``weights`` (a state_dict or an
    ``nn.Module`` of ``model.net``'s architecture), for any prior: hyperparameters at their MAP given the weights,
    ``z``'s locs at ``w / scale``, every scale ``init_scale`` (0 for a point-mass guide; None: each entry keeps
    the scale it has, e.g. IVON's from its initial Hessian; ``"laplace"``: each Linear and Conv2d
    entry at its diagonal Laplace scale ``(1 + scale^2 H)^-1/2``, ``H = curvature(trained net)[layer]`` the GGN
    diagonal summed over the training set, :func:`pyrozoo.posteriors.laplace.start_curvature`; other layers at
    :data:`LAPLACE_FALLBACK`). The model's masks are left as they are (all kept in a new model). ``steps``
    of the hyperparameters' fit (0: they stay where the guide has them)."""
    net = trained_net(model.net, weights, what)
    layers = model.layers
    w = {layer.name: layer.join(net).to(model.mask(layer.name)) for layer in layers}
    spread = 0.0 if guide.point_mass else init_scale
    found = {}
    if spread == LAPLACE:
        if curvature is None:
            raise PyrozooError(
                'init_scale="laplace" needs the curvature (pyrozoo.posteriors.laplace.start_curvature)'
            )
        found, spread = curvature(net), LAPLACE_FALLBACK
    current = guide.posterior()

    def scales(site, like):
        return current[site][1].clone() if spread is None else torch.full_like(like, spread)

    hyper = fit_hyperparameters(model, guide, w, steps)
    for site, loc in hyper.items():
        guide.write_posterior(site, loc, scales(site, loc))
    mean = guide.mean()
    hyper_mean = {site: mean[site] for site in hyper}
    for layer in layers:
        scale = layer_scale(model, layer, hyper_mean).expand(layer.shape)
        z = w[layer.name] / scale
        if layer.name in found:
            # the diagonal Laplace posterior of z = w / scale under its N(0, 1) prior: precision 1 + scale^2 H
            spread_z = (1 + scale.double().square() * found[layer.name]).rsqrt().to(z)
        else:
            spread_z = scales(layer.site, z)
        guide.write_posterior(layer.site, z, spread_z)
    # the net's own parameters (placeholders, but what a deterministic evaluation of model.net would read)
    for name, value in net.state_dict().items():
        model.net.state_dict()[name].copy_(value)


def start_from_net(model, guide) -> None:
    """Start ``guide``'s posterior at the net's own (torch) initialisation, the default start of any net but
    the paper's four (:class:`pyrozoo.nets.NetEntry`'s ``start``): :func:`start_from_weights` with
    ``model.net``'s initial weights, each scale kept as the guide drew it.

    The guide's own start draws every latent's loc uniformly in (-2, 2), so a weight's mean has a scale of about
    ``hidden_scale`` whatever its fan-in: right for LeNet and the MLP the paper measured, but ten times torch's
    ``1/sqrt(fan_in)`` in a 3x3 conv of 512 channels, and compounding with depth where nothing normalises
    (logits of 1e8 in a ResNet without BatchNorm; 40 in resnet18's head). From the net's initialisation, the
    posterior means give torch's activations, the prior's layer scales sit at their MAP given those weights
    (so each ``z`` is of order one, and a posterior scale of 0.1 is a tenth of the weight scale), and the
    initial ELBO's data term is the plain net's ``N x`` cross-entropy."""
    start_from_weights(model, guide, model.net, init_scale=None, what="the net's initialisation")
