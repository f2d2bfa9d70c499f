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

import itertools
import warnings
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
    model, posterior, x: Tensor, draws: Iterable[tuple[dict, dict]], inputs_per_pass: int = 8192
) -> Iterator[tuple[Tensor, dict]]:
    """``(f(x; θ*) + J(x) (θ_s - θ*), latents_s)`` for each posterior draw ``(weights θ_s, latents_s)`` of
    ``draws``, with ``θ*`` the weights at the posterior's mean (``posterior.loc``, the model's masks applied).

    The weights must be linear in the latents (a Laplace model's fixed prior scales, ``w = s · mask · z``), so
    that ``θ_s - θ*`` is the draw's offset in weight space. Draws go through the forward-mode product together,
    as many as make about ``inputs_per_pass`` inputs (``torch.func.vmap``: one pass instead of one per draw on
    small batches)."""
    names = [layer.name for layer in model.layers]
    centre = model.weights_from(posterior.loc)
    primals = tuple(centre[name] for name in names)

    def net(*weights):
        return model.logits(x, dict(zip(names, weights)))

    def offset(*tangents):
        return torch.func.jvp(net, primals, tangents)[1]

    mean = net(*primals)
    together = max(1, inputs_per_pass // max(len(x), 1))
    draws = iter(draws)
    while chunk := list(itertools.islice(draws, together)):  # the draws made as they are needed
        tangents = tuple(torch.stack([w[name] - centre[name] for w, _ in chunk]) for name in names)
        with warnings.catch_warnings():
            # torch's first forward-mode product loads its decompositions through the deprecated jit.script
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
            offsets = torch.func.vmap(offset)(*tangents)
        yield from ((mean + o, latents) for o, (_, latents) in zip(offsets, chunk))
