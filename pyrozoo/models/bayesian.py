"""Turn a deterministic ``nn.Module`` into a Pyro model with a prior per layer and a keep-mask per layer."""

from __future__ import annotations

import functools
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.distributions import register_kl
from torch.func import functional_call

from pyrozoo.models.layers import Layer, find_layers
from pyrozoo.models.likelihoods import Categorical
from pyrozoo.models.priors import flat


def _buffer_name(layer_name: str) -> str:
    return layer_name.replace(".", "-")  # buffer names cannot hold dots


class StandardNormal(dist.Normal):
    """``N(0, 1)`` with a given batch shape: the prior of every weight latent ``z``."""

    def __init__(self, shape: torch.Size, device=None, dtype=None):
        zero = torch.zeros((), device=device, dtype=dtype)
        super().__init__(zero.expand(shape), (zero + 1).expand(shape))


@functools.lru_cache(maxsize=1024)
def _standard_normal_latent(shape: torch.Size, device, dtype):
    """The prior of a layer's latent, built once per shape: it holds only two broadcast constants, and building
    it every step is a visible share of a small net's step."""
    return StandardNormal(shape, device, dtype).to_event(2)


@register_kl(torch.distributions.Normal, StandardNormal)
def _kl_normal_standard_normal(p, q):
    # The general Normal-Normal KL spends half its arithmetic on the constant loc 0 and scale 1;
    # with a million weights per layer that is a visible share of a training step.
    return 0.5 * (p.scale.square() + p.loc.square() - 1) - p.scale.log()


class BayesianModel(nn.Module):
    """A Pyro model built from any ``nn.Module`` ``net``: every Linear/Conv/LayerNorm layer's weight and bias, and
    every free parameter of a container module (class token, position embedding), are random.

    Per layer, one latent site ``<layer>.weight_base`` holds ``z ~ N(0, 1)`` of shape ``(out, fan_in + 1)``; the
    ``prior`` draws the layer's scale, and the weights are ``scale * mask * z``. Masks are buffers (saved with
    ``state_dict``); a zero entry is a pruned weight. ``output`` names the output layer (see
    :func:`~pyrozoo.models.layers.find_layers`); ``prunable_kinds`` says which kinds of group BMR may prune
    (``"weight"``; add ``"norm"`` or ``"tensor"`` to prune LayerNorms or embeddings too).

    Usage::

        model = BayesianModel(create_net("lenet", in_channels=1, image_size=32, num_classes=10), prior=flat)
        model(x, y, dataset_size=60000)        # the Pyro model, for SVI
        logits = model.logits(x, weights)      # a forward pass at given weights
    """

    def __init__(
        self,
        net: nn.Module,
        prior: Callable[[Layer], torch.Tensor] = flat,
        likelihood=None,
        output: str | None = None,
        prunable_kinds: tuple[str, ...] = ("weight",),
    ):
        super().__init__()
        self.net = net
        self.prior = prior
        self.likelihood = likelihood or Categorical()
        self._layers = find_layers(net, output, prunable_kinds)
        self.masks = nn.Module()
        for layer in self._layers:
            self.masks.register_buffer(
                _buffer_name(layer.name), torch.ones(layer.shape, dtype=layer.dtype, device=layer.device)
            )
        for p in net.parameters():  # the net's own parameters are placeholders: weights come from the latents
            p.requires_grad_(False)
        self._pruned: set[str] = (
            set()
        )  # layers with at least one pruned weight (others skip the mask product)
        self.register_load_state_dict_post_hook(lambda module, _: module._find_pruned())

    def _find_pruned(self) -> None:
        self._pruned = {layer.name for layer in self._layers if not bool(self.mask(layer.name).all())}

    @property
    def layers(self) -> list[Layer]:
        """The random layers, with ``device`` and ``dtype`` of the model as it is now."""
        mask = self.mask(self._layers[0].name)
        if self._layers[0].device != mask.device or self._layers[0].dtype != mask.dtype:
            self._layers = [layer.on(mask.device, mask.dtype) for layer in self._layers]
        return self._layers

    def mask(self, layer_name: str) -> torch.Tensor:
        """The layer's keep-mask (1 keeps a weight, 0 prunes it), shaped like its latent."""
        return getattr(self.masks, _buffer_name(layer_name))

    @torch.no_grad()
    def set_mask(self, layer_name: str, keep: torch.Tensor) -> None:
        """Replace a layer's keep-mask (``keep`` is boolean or 0/1, shaped like the layer's latent)."""
        mask = self.mask(layer_name)
        if keep.shape != mask.shape:
            raise ValueError(
                f"mask for {layer_name} must have shape {tuple(mask.shape)}, got {tuple(keep.shape)}"
            )
        mask.copy_(keep)
        if bool(mask.all()):
            self._pruned.discard(layer_name)
        else:
            self._pruned.add(layer_name)

    def sample_weights(self) -> dict[str, torch.Tensor]:
        """Draw every layer's scale and latent (Pyro sample sites) and return ``{layer: weights}``."""
        weights = {}
        for layer in self.layers:
            scale = self.prior(layer)
            z = pyro.sample(layer.site, _standard_normal_latent(layer.shape, layer.device, layer.dtype))
            if layer.name in self._pruned:
                z = self.mask(layer.name) * z
            weights[layer.name] = scale * z
        return weights

    def weights_from(self, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights at given latent values (e.g. a posterior sample returned by a guide)."""
        return poutine.condition(self.sample_weights, data=latents)()

    def logits(self, x: torch.Tensor, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """The net's output with its parameters replaced by ``weights``."""
        params = {}
        for layer in self.layers:
            params.update(layer.split(weights[layer.name]))
        return functional_call(self.net, params, (x,))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, dataset_size: int | None = None):
        logits = self.logits(x, self.sample_weights())
        return self.likelihood(logits, y, dataset_size)
