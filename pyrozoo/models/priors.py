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


def flat(layer: Layer):
    """Flat prior (PAPER.md §2): one precision-like scale per layer, ``c^-2 ~ Gamma(2, 2)`` (shape, rate).

    Hidden layers use ``c = (c^-2)^(-1/2) / 10``, the output layer ``c = (c^-2)^(-1/2)``.
    """
    precision = pyro.sample(f"{layer.name}.precision", dist.Gamma(layer.const(2.0), layer.const(2.0)))
    scale = precision.rsqrt()
    return scale if layer.is_output else scale / 10


PRIORS = {"flat": flat}
