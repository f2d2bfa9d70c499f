"""Turn a deterministic ``nn.Module`` into a Pyro model with a prior per layer and a keep-mask per layer."""

from __future__ import annotations

import copy
import functools
from typing import Any, Callable

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.distributions import register_kl
from torch.func import functional_call

from pyrozoo.errors import PyrozooError
from pyrozoo.models.layers import Layer, Selector, find_layers, in_transform, parse_selectors
from pyrozoo.models.likelihoods import Categorical
from pyrozoo.models.priors import flat


def _buffer_name(layer_name: str) -> str:
    return layer_name.replace(".", "-")  # buffer names cannot hold dots


class StandardNormal(dist.Normal):
    """``N(0, 1)`` with a given batch shape: the prior of every weight latent ``z``."""

    def __init__(self, shape: torch.Size, device=None, dtype=None):
        zero = torch.zeros((), device=device, dtype=dtype)
        super().__init__(zero.expand(shape), (zero + 1).expand(shape))

    def expand(self, batch_shape, _instance=None):
        # Pyro's vectorised plates (Predictive(parallel=True), vectorised particles) expand the prior; the
        # constructor's signature differs from Normal's, so build the expanded instance through Normal's
        new = self._get_checked_instance(StandardNormal, _instance)
        return super().expand(batch_shape, _instance=new)


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
    """A Pyro model built from any ``nn.Module`` ``net``: its random modules' parameters become latents, its
    deterministic ones stay point estimates (:mod:`pyrozoo.models.layers` says which is which).

    Per random layer, one latent site ``<layer>.weight_base`` holds ``z ~ N(0, 1)`` of shape
    ``(out, fan_in + 1)``; the ``prior`` draws the layer's scale, and the weights are ``scale * mask * z``. Masks
    are buffers (saved with ``state_dict``); a zero entry is a pruned weight. ``output`` names the output layer
    (see :func:`~pyrozoo.models.layers.find_layers`); ``prunable_kinds`` says which kinds of group BMR may prune
    (``"weight"``; add ``"norm"``, ``"embedding"`` or ``"tensor"`` to prune those too).

    Deterministic modules (BatchNorm by default; any module chosen with ``deterministic=[type or name, ...]``)
    keep their parameters as plain ``nn.Parameter`` point estimates that train beside the guide
    (:meth:`deterministic_parameters`) and are saved in ``state_dict``; BatchNorm's running statistics follow
    ``train()``/``eval()`` as in torch: SVI steps update them, evaluation and BMR do not. ``random=[...]`` makes
    modules random that are deterministic by default.

    The user's ``net`` is copied, never changed. Any forward signature works: ``x`` may be a tensor, a tuple of
    the net's positional inputs or a dict of its keyword inputs; ``output_key`` picks the logits out of a
    dict or tuple output (a key, an index, or a callable). ``example_input`` (a batch, in the same form as
    ``x``) is what BMR traces the net with to find its coupled units; by default the first batch the model
    sees.

    Usage::

        model = BayesianModel(create_net("lenet", in_channels=1, image_size=32, num_classes=10), prior=flat)
        model(x, y, dataset_size=60000)        # the Pyro model, for SVI
        logits = model.logits(x, weights)      # a forward pass at given weights
        model = BayesianModel(two_input_net, deterministic=[nn.Embedding], output_key="logits")
        model((tokens, lengths), y, dataset_size=60000)
    """

    def __init__(
        self,
        net: nn.Module,
        prior: Callable[[Layer], torch.Tensor] = flat,
        likelihood=None,
        output: str | None = None,
        prunable_kinds: tuple[str, ...] = ("weight",),
        deterministic: list[Selector] | str | None = None,
        random: list[Selector] | str | None = None,
        output_key: Any = None,
        example_input: Any = None,
    ):
        super().__init__()
        self.net = copy.deepcopy(
            net
        )  # ours to change (requires_grad, functional calls); tying survives the copy
        self.prior = prior
        self.likelihood = likelihood or Categorical()
        self.output_key = output_key
        self.deterministic, self.random = parse_selectors(deterministic), parse_selectors(random)
        self._layers = find_layers(self.net, output, prunable_kinds, self.deterministic, self.random)
        # the latents' shapes in the net as built, and (once compacted, pyrozoo.bmr.compact) the original row
        # and column indices each compacted layer's latent still holds: reports speak of the original net
        self.full_shapes: dict[str, torch.Size] = {layer.name: layer.shape for layer in self._layers}
        self.kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.masks = nn.Module()
        for layer in self._layers:
            self.masks.register_buffer(
                _buffer_name(layer.name), torch.ones(layer.shape, dtype=layer.dtype, device=layer.device)
            )
        random_params = {layer.weight_name for layer in self._layers} | {
            layer.bias_name for layer in self._layers if layer.has_bias
        }
        self._random_params = random_params
        for name, p in self.net.named_parameters():
            # random parameters are placeholders (weights come from the latents); deterministic ones train
            p.requires_grad_(name not in random_params)
        self._example = None if example_input is None else _detached(example_input)
        self._pruned: set[str] = (
            set()
        )  # layers with at least one pruned weight (others skip the mask product)
        self.register_load_state_dict_post_hook(lambda module, _: module._find_pruned())

    def deterministic_parameters(self) -> list[nn.Parameter]:
        """The point-estimate parameters (BatchNorm affine, modules selected deterministic, a learned
        likelihood noise), to train with the guide's: the model's parameters that take gradients."""
        return [p for p in self.parameters() if p.requires_grad]

    def example_input(self):
        """A small batch to trace the net with: ``example_input`` or the first batch seen."""
        if self._example is None:
            self._example = _guess_example(self.net)
        if self._example is None:
            raise PyrozooError(
                f"finding {type(self.net).__name__}'s units needs an example input: pass "
                "BayesianModel(..., example_input=x) or run the model on a batch first"
            )
        return self._example

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

    def has_pruned(self, layer_name: str) -> bool:
        """Whether the layer has a pruned entry (a layer without one can skip the product with its mask)."""
        return layer_name in self._pruned

    def sample_weights(self) -> dict[str, torch.Tensor]:
        """Draw every latent (Pyro sample sites): each layer's scale and ``z``, then the likelihood's own (a
        Gaussian's noise precision). Returns ``{layer: weights}``, plus ``{site: value}`` of the likelihood's
        latents, which :meth:`forward` hands to the likelihood; every guide covers what this draws."""
        weights = {}
        for layer in self.layers:
            scale = self.prior(layer)
            z = pyro.sample(layer.site, _standard_normal_latent(layer.shape, layer.device, layer.dtype))
            if layer.name in self._pruned:
                z = self.mask(layer.name) * z
            if z.dim() > 2 and torch.is_tensor(scale) and 0 < scale.dim() < z.dim():
                # draws stacked by a vectorised plate (Predictive(parallel=True)): Pyro gives a global scalar
                # site the shape (draws, 1) but a latent matrix (draws, rows, cols); one scale per draw
                batch = z.shape[:-2]
                if scale.shape[: len(batch)] == batch and scale[0].numel() == 1:
                    scale = scale.reshape(batch + (1, 1))
            weights[layer.name] = scale * z
        weights.update(self.likelihood.sample_latents(self.mask(self._layers[0].name)))
        return weights

    def weights_from(self, latents: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weights at given latent values (e.g. a posterior sample returned by a guide)."""
        return poutine.condition(self.sample_weights, data=latents)()

    def logits(self, x, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        """The net's output (picked by ``output_key``) with its random parameters replaced by ``weights``.
        Weights with leading batch dimensions (draws stacked by a vectorised plate, e.g.
        ``Predictive(parallel=True)``) give one output per draw, stacked along those dimensions."""
        if self._example is None:
            self._example = _detached(x)
        layers = self.layers
        args, kwargs = call_arguments(x)

        def one(*ws, nhwc=False):
            params = {}
            for layer, w in zip(layers, ws):
                params.update(layer.split(w))
            return self._output(params, args, kwargs, nhwc)

        first = weights[layers[0].name]
        batch = first.shape[: first.dim() - 2]
        if not batch:
            # channels-last on the CPU, outside torch.func's transforms (vmap's batched weights cannot take it)
            plain = not in_transform(first)
            return one(*(weights[layer.name] for layer in layers), nhwc=plain and first.device.type == "cpu")
        flat = [weights[layer.name].expand(batch + layer.shape).reshape(-1, *layer.shape) for layer in layers]
        out = torch.vmap(one, randomness="different")(*flat)
        return out.reshape(batch + out.shape[1:])

    def logits_of_params(self, x, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """:meth:`logits` from the net's parameters themselves (``{name: tensor}`` as :meth:`Layer.split`
        gives them, no batch dimensions): for a caller that has them apart already (IVON's compiled draw)."""
        if self._example is None:
            self._example = _detached(x)
        args, kwargs = call_arguments(x)
        return self._output(params, args, kwargs, nhwc=next(iter(params.values())).device.type == "cpu")

    def _output(self, params: dict[str, torch.Tensor], args, kwargs, nhwc: bool) -> torch.Tensor:
        if nhwc:
            params = {name: _channels_last(p) for name, p in params.items()}
        return select_output(functional_call(self.net, params, args, kwargs), self.output_key)

    def forward(self, x, y: torch.Tensor | None = None, dataset_size: int | None = None):
        weights = self.sample_weights()
        return self.likelihood(self.logits(x, weights), y, dataset_size, weights)


def _channels_last(p: torch.Tensor) -> torch.Tensor:
    """A 2-D convolution's weight in channels-last order (the same values): oneDNN's CPU convolutions then run,
    and hand their output on, in channels-last, which its kernels prefer (LeNet's step 0.88x, the BatchNorm CNN's
    0.66x of torch's default order, experiments/RESULTS.md); the other parameters as they are."""
    if p.dim() != 4:
        return p
    # a copy with channels-last strides even where the layout is ambiguous (one input channel), so that the
    # convolution reads it as channels-last
    return torch.empty_like(p, memory_format=torch.channels_last).copy_(p)


def call_arguments(x) -> tuple[tuple, dict]:
    """The net's positional and keyword arguments for an input ``x``: a tensor, a tuple or a dict."""
    if isinstance(x, dict):
        return (), dict(x)
    if isinstance(x, (tuple, list)):
        return tuple(x), {}
    return (x,), {}


def select_output(out, output_key=None) -> torch.Tensor:
    """The logits out of a net's output: itself if a tensor, else picked by ``output_key``."""
    if callable(output_key):
        return output_key(out)
    if output_key is not None:
        try:
            return out[output_key]
        except (KeyError, IndexError, TypeError):
            raise PyrozooError(
                f"output_key {output_key!r} does not pick anything from the net's output"
            ) from None
    if isinstance(out, torch.Tensor):
        return out
    what = f"a dict with keys {list(out)}" if isinstance(out, dict) else f"a {type(out).__name__}"
    raise PyrozooError(f"the net returns {what}: say which part is the logits with output_key=")


def _detached(x, size: int = 2):
    if isinstance(x, dict):
        return {k: _detached(v, size) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_detached(v, size) for v in x)
    return x[:size].detach().clone() if isinstance(x, torch.Tensor) and x.dim() > 0 else x


def _guess_example(net: nn.Module):
    """An example batch for common first layers: a ViT's image size, a first conv or a first linear layer.
    Drawn from its own generator, so that the global random state is left alone."""
    parameter = next(net.parameters(), None)
    device = parameter.device if parameter is not None else None
    size = next((m.img_size for m in net.modules() if getattr(m, "img_size", None) is not None), None)
    if isinstance(size, int):
        size = (size, size)
    generator = torch.Generator().manual_seed(0)
    for module in net.modules():
        shape = None
        if isinstance(module, nn.Conv2d):
            shape = (2, module.in_channels, *(tuple(size) if size is not None else (32, 32)))
        elif isinstance(module, nn.Conv1d):
            shape = (2, module.in_channels, 32)
        elif isinstance(module, nn.Linear):
            shape = (2, module.in_features)
        elif isinstance(module, nn.Embedding):
            return torch.randint(0, module.num_embeddings, (2, 8), generator=generator).to(device)
        if shape is not None:
            return torch.randn(shape, generator=generator).to(device)
    return None
