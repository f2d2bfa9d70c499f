"""Priors over layer scales: each is a small function you can read, edit or replace.

A prior is called once per layer inside the Pyro model as ``prior(layer)``. It may draw hyperparameters with
``pyro.sample`` (name them ``f"{layer.name}.<something>"``) and returns the scale that multiplies the layer's
standard-normal latent ``z`` (shape ``layer.shape``): a scalar, or a tensor that broadcasts against it (one value
per output row, say). The weights are then ``w = scale * mask * z`` (non-centred form, docs/method.md#model).

``layer.const(v)`` makes a constant on the model's device and dtype, so a prior works on CPU and GPU alike.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist

from pyrozoo.errors import PyrozooError
from pyrozoo.models.layers import Layer
from pyrozoo.registry import Registry

PRIORS = Registry("prior")


@PRIORS.register("flat")
def flat(layer: Layer, hidden_scale: float = 0.1):
    """Flat prior (docs/method.md#priors): one precision-like scale per layer, ``c^-2 ~ Gamma(2, 2)`` (shape,
    rate).

    Hidden layers use ``c = hidden_scale * (c^-2)^(-1/2)`` (``hidden_scale`` 1/10 as in the paper), the output
    layer ``c = (c^-2)^(-1/2)``.
    """
    if not hidden_scale > 0:
        raise PyrozooError(f"flat prior: hidden_scale must be positive, got {hidden_scale}")
    precision = pyro.sample(f"{layer.name}.precision", dist.Gamma(layer.const(2.0), layer.const(2.0)))
    scale = precision.rsqrt()
    return scale if layer.is_output else scale * hidden_scale


@PRIORS.register("tiered")
def tiered(layer: Layer, tau0: float = 1e-2, local: bool = False):
    """Regularised horseshoe ("tiered", docs/method.md#priors) with one scale per output row.

    Half-Cauchy variables are ratios of Gamma(1/2, 1) pairs, each pair drawn as one site with a last dimension
    of 2 (numerator, denominator). Hidden layers: slab ``c^-2 ~ Gamma(2, 6)``, global pair ``(a, b)``, per-row
    pair ``(v_r, u_r)``; ``psi_r = tau0^2 (a / b) v_r`` and ``gamma_r^2 = psi_r / (u_r + c^-2 psi_r)``, i.e.
    ``c^2 s^2 / (c^2 + s^2)`` with the horseshoe scale ``s = tau0 * sqrt(a/b) * sqrt(v_r/u_r)``. The output
    layer gets one half-Cauchy scale ``sqrt(a / b)``. ``local=True`` adds a per-weight half-Cauchy factor.
    """
    if not tau0 > 0:
        raise PyrozooError(f"tiered prior: tau0 must be positive, got {tau0}")
    half, one = layer.const(0.5), layer.const(1.0)

    def pairs(name: str, *shape: int):
        return pyro.sample(
            f"{layer.name}.{name}", dist.Gamma(half, one).expand([*shape, 2]).to_event(len(shape) + 1)
        )

    a, b = pairs("global").unbind(-1)
    if layer.is_output:
        return (a / b).sqrt()
    slab = pyro.sample(f"{layer.name}.slab_precision", dist.Gamma(layer.const(2.0), layer.const(6.0)))
    # The per-layer scalars broadcast against the (rows, 1) matrix. Under a vectorised plate (Predictive(
    # parallel=True)) each value carries the draws' batch dimensions in front, and a guide's scalar site may
    # hold the plate's singleton dimension where a vector site does not: line them up with the global pair's.
    slab = slab.reshape(a.shape)
    a, b, slab = a[..., None, None], b[..., None, None], slab[..., None, None]
    v, u = pairs("rows", layer.shape[0], 1).unbind(-1)
    psi = tau0**2 * (a / b) * v
    if local:
        v_k, u_k = pairs("weights", *layer.shape).unbind(-1)
        psi, u = psi * v_k, u * u_k
    return (psi / (u + slab * psi)).sqrt()


@PRIORS.register("gaussian")
def gaussian(layer: Layer, hidden_scale: float = 0.1, output_scale: float = 1.0):
    """A fixed Gaussian prior, no hyperparameters: ``w ~ N(0, hidden_scale^2)`` in hidden layers and
    ``N(0, output_scale^2)`` in the output layer (the flat prior with its layer precision fixed at 1).

    This is the prior of weight decay: IVON's (pyrozoo.guides.ivon) weight decay of a layer is
    ``1 / (ess * scale^2)``, so with this prior the model's evidence and IVON's objective are the same."""
    for name, value in (("hidden_scale", hidden_scale), ("output_scale", output_scale)):
        if not value > 0:
            raise PyrozooError(f"gaussian prior: {name} must be positive, got {value}")
    return layer.const(output_scale if layer.is_output else hidden_scale)
