"""Priors over layer scales: each is a small function you can read, edit or replace.

A prior is called once per layer inside the Pyro model as ``prior(layer)``. It may draw hyperparameters with
``pyro.sample`` (name them ``f"{layer.name}.<something>"``) and returns the scale that multiplies the layer's
standard-normal latent ``z`` (shape ``layer.shape``): a scalar, or a tensor that broadcasts against it (one value
per output row, say). The weights are then ``w = scale * mask * z`` (non-centred form, PAPER.md §2).

``layer.const(v)`` makes a constant on the model's device and dtype, so a prior works on CPU and GPU alike.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist

from pyrozoo.models.layers import Layer


def flat(layer: Layer, hidden_scale: float = 0.1):
    """Flat prior (PAPER.md §2): one precision-like scale per layer, ``c^-2 ~ Gamma(2, 2)`` (shape, rate).

    Hidden layers use ``c = hidden_scale * (c^-2)^(-1/2)`` (``hidden_scale`` 1/10 as in the paper), the output
    layer ``c = (c^-2)^(-1/2)``.
    """
    precision = pyro.sample(f"{layer.name}.precision", dist.Gamma(layer.const(2.0), layer.const(2.0)))
    scale = precision.rsqrt()
    return scale if layer.is_output else scale * hidden_scale


def tiered(layer: Layer, tau0: float = 1e-2, local: bool = False):
    """Regularised horseshoe ("tiered", PAPER.md §2) with one scale per output row.

    Half-Cauchy variables are ratios of Gamma(1/2, 1) pairs. Hidden layers: slab ``c^-2 ~ Gamma(2, 6)``, global
    pair ``(a, b)``, per-row pair ``(u_r, v_r)``; ``psi_r = tau0^2 (a / b) v_r`` and
    ``gamma_r^2 = psi_r / (u_r + c^-2 psi_r)``, i.e. ``c^2 s^2 / (c^2 + s^2)`` with the horseshoe scale
    ``s = tau0 * sqrt(a/b) * sqrt(v_r/u_r)``. The output layer gets one half-Cauchy scale ``sqrt(a / b)``.
    ``local=True`` adds a per-weight half-Cauchy factor (pairs ``(u_k, v_k)`` per weight).
    """
    half = layer.const(0.5)
    one = layer.const(1.0)
    a = pyro.sample(f"{layer.name}.global_num", dist.Gamma(half, one))
    b = pyro.sample(f"{layer.name}.global_den", dist.Gamma(half, one))
    if layer.is_output:
        return (a / b).sqrt()
    rows = layer.shape[0]
    slab = pyro.sample(f"{layer.name}.slab_precision", dist.Gamma(layer.const(2.0), layer.const(6.0)))
    row_pair = dist.Gamma(half, one).expand([rows, 1]).to_event(2)
    u = pyro.sample(f"{layer.name}.row_den", row_pair)
    v = pyro.sample(f"{layer.name}.row_num", row_pair)
    psi = tau0**2 * (a / b) * v
    if local:
        weight_pair = dist.Gamma(half, one).expand(layer.shape).to_event(2)
        u = u * pyro.sample(f"{layer.name}.weight_den", weight_pair)
        psi = psi * pyro.sample(f"{layer.name}.weight_num", weight_pair)
    return (psi / (u + slab * psi)).sqrt()


PRIORS = {"flat": flat, "tiered": tiered}
