"""The linearised (GLM) predictive of a Laplace posterior (MacKay 1992; Immer et al. 2021).

Sampling weights from a Laplace posterior of a whole network and running the net at them collapses its accuracy
(0.09-0.32 on LeNet): the Gaussian is a local, second-order fit, and far draws leave the region where it holds.
The linearised model ``f_lin(x; w) = f(x; w*) + J(x) (w - w*)``, with ``J`` the net's Jacobian in its weights at
the posterior mean ``w*``, is the model whose GGN the Laplace posterior is the exact posterior of; under it the
predictive keeps the net's own prediction at its centre and spreads around it by ``J Σ Jᵀ``.

:func:`linearised_outputs` draws it by Monte Carlo: for each weight draw ``w_s`` of the posterior (diagonal or
Kronecker-factored, the draws :func:`pyrozoo.predict.predict` already makes, seeded and alike for every batch),
one forward-mode product ``J(x) (w_s - w*)`` (``torch.func.jvp``: no Jacobian is formed). The draws go through
the model's ``weights_from``, so a pruned weight (mask 0) is 0 in ``w_s`` and in ``w*``, and its offset too.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor

from pyrozoo.errors import PyrozooError

PREDICTIVES = ("glm", "samples")  # the linearised model; the net at sampled weights


def check_predictive(predictive: str) -> str:
    if predictive not in PREDICTIVES:
        raise PyrozooError(
            f"the Laplace predictive is glm (the linearised net, the default) or samples (the net at sampled "
            f"weights), not {predictive!r}"
        )
    return predictive


def linearised_outputs(
    model, posterior, x: Tensor, draws: Iterable[tuple[dict, dict]]
) -> Iterator[tuple[Tensor, dict]]:
    """``(f(x; w*) + J(x) (w_s - w*), latents_s)`` for each posterior draw ``(weights w_s, latents_s)`` of
    ``draws``, with ``w*`` the weights at the posterior's mean (``posterior.loc``, the model's masks applied).

    The weights must be linear in the latents (a Laplace model's fixed prior scales, ``w = s · mask · z``), so
    that ``w_s - w*`` is the draw's offset in weight space."""
    names = [layer.name for layer in model.layers]
    centre = model.weights_from(posterior.loc)
    primals = tuple(centre[name] for name in names)

    def net(*weights):
        return model.logits(x, dict(zip(names, weights)))

    mean = net(*primals)
    for weights, latents in draws:
        tangents = tuple(weights[name] - centre[name] for name in names)
        _, offset = torch.func.jvp(net, primals, tangents)
        yield mean + offset, latents
