"""Other libraries' mean-field Bayesian nets, built from the same ``nn.Module`` with a N(0, 1) prior on every
weight and trained by Adam, for the benchmarks that set pyrozoo beside them (``pip install -e ".[bench]"``):

- bayesian-torch (``dnn_to_bnn``, reparameterised layers): with the KL it ships (each layer's KL *averaged*
  over its weights, so the loss is far from an ELBO) and with that KL summed, which makes the loss the true
  negative ELBO that pyrozoo minimises;
- TyXe (``VariationalBNN``, its ``AutoNormal`` guide, the KL in closed form), which calls
  ``pyro.util.deep_getattr``, gone from Pyro 1.9: :func:`_shim_tyxe` puts it back;
- plain Pyro (``PyroModule`` with ``PyroSample`` priors, ``AutoNormal``, ``TraceMeanField_ELBO``).

Each builder returns a :class:`Peer` (None where the library is not installed): ``step(x, y)`` takes one step of
the negative ELBO with the minibatch's log-likelihood scaled to ``dataset_size``, and ``log_probs(x)`` draws one
posterior sample of the weights and returns the class log-probabilities.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import SVI, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.nn import PyroSample

# bayesian-torch's own start: means N(0, 0.1), scales softplus(-3) = 0.049
BAYESIAN_TORCH_PRIOR = {
    "prior_mu": 0.0,
    "prior_sigma": 1.0,
    "posterior_mu_init": 0.0,
    "posterior_rho_init": -3.0,
    "type": "Reparameterization",
    "moped_enable": False,
}
INIT_SCALE = 0.05  # the Pyro guides' starting scale, near bayesian-torch's


@dataclass
class Peer:
    name: str
    step: Callable[[torch.Tensor, torch.Tensor], None]
    log_probs: Callable[[torch.Tensor], torch.Tensor]
    # bayesian-torch's step in its parts (benchmarks/step_phases.py times them apart): the loss and the optimiser
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    optimizer: torch.optim.Optimizer | None = None


def _summed_kl_div(mu_q, sigma_q, mu_p, sigma_p):
    """bayesian-torch's Gaussian KL (``BaseVariationalLayer_.kl_div``) summed over the weights, not averaged."""
    kl = torch.log(sigma_p) - torch.log(sigma_q) + (sigma_q**2 + (mu_q - mu_p) ** 2) / (2 * sigma_p**2) - 0.5
    return kl.sum()


def bayesian_torch(
    net: torch.nn.Module, dataset_size: int, lr: float, summed: bool, fused: bool = False
) -> Peer | None:
    """bayesian-torch's mean-field net made from a copy of ``net``; ``summed``: its KL summed (the true ELBO);
    ``fused``: tuned as pyrozoo is, trained by torch's fused Adam (one kernel per parameter) rather than its
    default, its convolutions' parameters and inputs in channels-last order."""
    try:
        from bayesian_torch.models.dnn_to_bnn import dnn_to_bnn, get_kl_loss
    except ImportError:
        return None
    bnn = copy.deepcopy(net)
    dnn_to_bnn(bnn, BAYESIAN_TORCH_PRIOR)
    if summed:  # every layer computes its KL through its own kl_div: replace it on each layer
        for layer in bnn.modules():
            if hasattr(layer, "kl_loss"):
                layer.kl_div = _summed_kl_div
    if fused:
        bnn.to(memory_format=torch.channels_last)  # its 4-D parameters and noise buffers
    optimizer = torch.optim.Adam(bnn.parameters(), lr=lr, fused=fused or None)

    def loss(x, y):
        if fused and x.dim() == 4:  # channels-last strides even with one channel, where .contiguous keeps them
            x = torch.empty_like(x, memory_format=torch.channels_last).copy_(x)
        return F.cross_entropy(bnn(x), y, reduction="sum") * (dataset_size / len(x)) + get_kl_loss(bnn)

    def step(x, y):
        value = loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    # bayesian-torch draws new weights at every forward pass: one pass is one posterior sample
    name = f"bayesian-torch, KL {'summed (true ELBO)' if summed else 'averaged (shipped)'}" + (
        ", fused Adam, channels-last" if fused else ""
    )
    return Peer(name, step, lambda x: torch.log_softmax(bnn(x), -1), loss, optimizer)


def _shim_tyxe() -> None:
    """TyXe 0.0.2 calls ``pyro.util.deep_getattr``, which Pyro 1.9 removed: the attribute path read by getattr."""
    import pyro.util

    if not hasattr(pyro.util, "deep_getattr"):
        pyro.util.deep_getattr = lambda obj, name: functools.reduce(getattr, name.split("."), obj)


def _svi_peer(name, model, guide, lr, predict) -> Peer:
    svi = SVI(model, guide, pyro.optim.Adam({"lr": lr}), TraceMeanField_ELBO())
    return Peer(name, lambda x, y: svi.step(x, y), predict)


def tyxe(net: torch.nn.Module, dataset_size: int, lr: float) -> Peer | None:
    """TyXe's variational BNN of a copy of ``net``: IID N(0, 1) prior, its AutoNormal guide."""
    try:
        import tyxe as tx
    except ImportError:
        return None
    _shim_tyxe()
    bnn = tx.VariationalBNN(
        copy.deepcopy(net),
        tx.priors.IIDPrior(dist.Normal(0.0, 1.0)),
        tx.likelihoods.Categorical(dataset_size),
        functools.partial(tx.guides.AutoNormal, init_scale=INIT_SCALE),
    )

    def log_probs(x):
        return torch.log_softmax(bnn.predict(x, num_predictions=1, aggregate=False)[0], -1)

    return _svi_peer("TyXe", bnn.model, bnn.guide, lr, log_probs)


def plain_pyro(net: torch.nn.Module, dataset_size: int, lr: float) -> Peer:
    """A copy of ``net`` as a PyroModule with a N(0, 1) prior on every parameter, Pyro's AutoNormal guide."""
    bnn = copy.deepcopy(net)
    pyro.nn.module.to_pyro_module_(bnn)
    for module in list(bnn.modules()):
        for key, value in list(module.named_parameters(recurse=False)):
            prior = dist.Normal(0.0, 1.0).expand(value.shape).to_event(value.dim())
            setattr(module, key, PyroSample(prior))

    def model(x, y=None):
        logits = bnn(x)
        with pyro.plate("data", dataset_size, subsample_size=len(x)):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)

    guide = AutoNormal(model, init_scale=INIT_SCALE)

    def log_probs(x):
        with torch.no_grad():
            weights = guide(x)  # one draw of every weight
            return torch.log_softmax(pyro.poutine.condition(bnn, data=weights)(x), -1)

    return _svi_peer("plain Pyro", model, guide, lr, log_probs)


def peers(net: torch.nn.Module, dataset_size: int, lr: float) -> tuple[list[Peer], list[str]]:
    """Every installed peer built on ``net``, and a line for each one that is not installed. Empties Pyro's
    parameter store first: TyXe's and Pyro's guides keep their parameters there by site name, so the peers of a
    net built before would lend theirs to another net's sites of the same name."""
    pyro.clear_param_store()
    built = {
        "bayesian-torch": [bayesian_torch(net, dataset_size, lr, summed) for summed in (False, True)],
        "tyxe": [tyxe(net, dataset_size, lr)],
        "pyro": [plain_pyro(net, dataset_size, lr)],
    }
    missing = [
        f"{library} is not installed: its lines are skipped (pip install -e '.[bench]')"
        for library, made in built.items()
        if None in made
    ]
    return [peer for made in built.values() for peer in made if peer is not None], missing
