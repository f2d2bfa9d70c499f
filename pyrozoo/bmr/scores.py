"""Scores of single entries, read from a posterior: BMR's evidence gain dF, and a hierarchical prior's shrinkage."""

from __future__ import annotations

import pandas as pd
import torch
from pyro import poutine

from pyrozoo.bmr.delta_f import point_mass_meanfield
from pyrozoo.errors import PyrozooError

# Every weight latent z has the model's standard-normal prior (non-centred form, w = scale * mask * z), so
# reducing a weight to zero is reducing N(0, 1) on z to a point mass: BMR never needs the layer scale.
Z_PRIOR_VAR = 1.0


def delta_f(model, posterior, layers=None, occam: bool = True) -> dict[str, torch.Tensor]:
    """dF of removing each weight of each prunable layer (or of ``layers``), ``{layer: tensor like its latent}``.

    dF = ½ ln(π s2) - ½ π μ² for the posterior N(μ, 1/π) and the prior N(0, s2). ``occam=False`` drops the
    Occam term ½ ln(π s2): what is left, ``-½ π μ² = ln q(0) - ln q(μ)``, compares the reduced model with the
    full one at their best weights (the posterior density at the reduced model's point against the mode; a
    generalised likelihood ratio under the Laplace approximation) instead of by their evidence, i.e. as if the
    weight cost no prior volume. In weights ``w = s z`` of a Laplace posterior (curvature ``h``, prior
    precision ``δ``) it is ``-½ (h + δ) w²``, Optimal Brain Damage's saliency with the prior's curvature."""
    if posterior.point_mass:
        raise PyrozooError(
            f"BMR needs a posterior with spread; {type(posterior).__name__} is a point mass (train with a "
            "mean-field method such as flat-ff or bmr-th, or fit a posterior around the point estimate: "
            "pyrozoo prune RUN --posterior SOURCE, the sources listed by pyrozoo info)"
        )
    locs_and_scales = posterior.posterior()
    out = {}
    for layer in model.layers:
        if not (layer.prunable if layers is None else layer.name in layers):
            continue
        loc, scale = locs_and_scales[layer.site]
        precision = scale.pow(-2)
        out[layer.name] = (
            point_mass_meanfield(loc, precision, Z_PRIOR_VAR) if occam else -0.5 * precision * loc * loc
        )
    return out


@torch.no_grad()
def posterior_scales(model, posterior, samples: int = 100) -> dict[str, torch.Tensor]:
    """Posterior mean of each layer's prior scale (``w = scale * mask * z``), e.g. the horseshoe's shrinkage
    ``E[gamma_r]`` per row, by Monte Carlo over ``samples`` draws of the posterior (one value per row; a
    per-weight scale is averaged over its row)."""
    total: dict[str, torch.Tensor] = {}
    with poutine.block():
        for _ in range(samples):
            latents = posterior()
            for layer in model.layers:
                scale = torch.as_tensor(poutine.condition(model.prior, data=latents)(layer))
                rows = (
                    scale.expand(layer.shape).mean(dim=1, keepdim=True)
                    if scale.dim()
                    else scale.expand(layer.shape[0], 1)
                )
                total[layer.name] = total.get(layer.name, 0) + rows
    return {name: value / samples for name, value in total.items()}


def scale_table(scales: dict[str, torch.Tensor]) -> pd.DataFrame:
    """One row per layer: mean, smallest and largest posterior-mean scale over its output rows."""
    return pd.DataFrame(
        [
            {
                "layer": name,
                "mean_scale": float(s.mean()),
                "min_scale": float(s.min()),
                "max_scale": float(s.max()),
            }
            for name, s in scales.items()
        ]
    )


def shrinkage_scores(model, scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores from posterior-mean scales: ``-scale`` per weight, so that pruning entries scoring above ``-T``
    prunes the rows whose scale is below ``T`` (a hierarchical prior's own verdict, turned into masks)."""
    return {layer.name: -scales[layer.name].expand(layer.shape) for layer in model.layers if layer.prunable}
