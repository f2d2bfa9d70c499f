"""Temperature scaling (Guo et al. 2017) folded into a plain net: one temperature ``T`` per net, fitted on held-out
labelled inputs by the NLL of ``logits / T``, then divided into the net's head (its last linear map's weight and
bias), so that the calibrated net is still the same plain module and exports as one.

Written here rather than taken from a library: torchmetrics and scikit-learn measure calibration but do not fit
a temperature, and a calibration library would be a dependency for a one-parameter convex fit (the NLL is
convex in ``1 / T``). The fold into the net, which no library does, is checked on an example batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional

from pyrozoo.errors import PyrozooError


BOUNDS = (0.05, 20.0)  # a temperature outside is a fit to too few or too easy inputs, not a calibration


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The temperature ``T`` in :data:`BOUNDS` minimising the mean NLL of ``softmax(logits / T)`` at ``labels``
    (float64 L-BFGS on ``log T``, from ``T = 1``; the NLL is convex in ``1 / T``, so the minimum clamped to the
    bounds is the constrained one). Inputs all classified right with growing margins pull ``T`` toward 0."""
    logits = logits.detach().double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [log_t], lr=1.0, max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe"
    )

    def nll() -> torch.Tensor:
        opt.zero_grad()
        loss = functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(nll)
    low, high = BOUNDS
    found = [t for t in (log_t.detach().exp().item(), low, high) if math.isfinite(t)]
    return min(
        (min(max(t, low), high) for t in found),
        key=lambda t: float(functional.cross_entropy(logits / t, labels)),
    )


def fold_temperature(net: nn.Module, head: str, temperature: float, example: torch.Tensor) -> None:
    """Divide ``net``'s logits by ``temperature`` in place, by dividing its module ``head``'s weight and bias.
    Checked on ``example`` (in eval mode): the net's outputs must become its old outputs over ``temperature``;
    where they do not (something not positively homogeneous follows the head), the net is put back and refused.
    """
    if not temperature > 0:
        raise PyrozooError(f"a temperature is positive, not {temperature}")
    module = net.get_submodule(head)
    if not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise PyrozooError(f"{head} ({type(module).__name__}) has no weight to fold a temperature into")
    training = net.training
    net.eval()
    with torch.no_grad():
        before = net(example)
        scaled = [p for p in (module.weight, getattr(module, "bias", None)) if isinstance(p, torch.Tensor)]
        for p in scaled:
            p.div_(temperature)
        after = net(example)
        if not torch.allclose(after, before / temperature, rtol=1e-4, atol=1e-5 * float(before.abs().max())):
            for p in scaled:
                p.mul_(temperature)
            net.train(training)
            raise PyrozooError(
                f"{head} is not the net's last linear map (what follows it is not scaled along), so a "
                "temperature cannot be folded into it"
            )
    net.train(training)
