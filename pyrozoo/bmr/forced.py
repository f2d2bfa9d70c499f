"""The forced-prune check (issue 28): do channels that BMR must remove really leave the rebuilt net?

Half the output channels of the first few prunable layers (and of the first layer that makes a removable
group's units, where none of those does) are put at the prior's point (posterior loc 0, a
small scale), every other weight is confident at the net's own value, and a BMR pass (per weight, then units)
runs. The channels it prunes must then be cut from the rebuilt plain net wherever the function allows, and the
rebuilt net must compute what the Bayesian model's posterior-mean net computes. ``trained_norms`` gives the
BatchNorm layers the statistics and affine of a trained net (at torch's initialisation BatchNorm maps 0 to 0,
which hides the constant a pruned channel leaves behind in a trained one).

The nets it is run on (:func:`zoo_names`): every torchvision classifier, and small members of timm's resnet,
efficientnet, convnext and vit families, at 32x32 input with 10 classes and no pretrained weights. A net is
checked where :func:`prepare` builds it: at most :data:`MAX_PARAMETERS` parameters (the Bayesian model holds
several copies of each) and a forward pass at 32x32 that works.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from pyrozoo.models.bayesian import call_arguments, select_output
from pyrozoo.models.layers import is_batch_norm


@dataclass(frozen=True)
class ForcedPrune:
    """What the check found: parameters of the dense and the rebuilt net, the largest output difference
    (relative to the largest output), whether the predicted classes agree and whether ``torch.export`` took
    the rebuilt net (its error otherwise)."""

    dense: int
    sparse: int
    difference: float
    same_class: bool
    export: str  # "" when torch.export worked, else its one-line error
    forced: int  # channels put at the prior's point
    removed: int  # of them, those the rebuilt net no longer has
    forced_heads: int = 0  # attention heads whose value rows were put at the prior's point (heads=True)
    removed_heads: int = 0  # attention heads the rebuilt net no longer has

    @property
    def passed(self) -> bool:
        return self.sparse < self.dense and self.difference <= 1e-5 and self.same_class and not self.export


@torch.no_grad()
def train_like_norms(net: nn.Module, seed: int = 0) -> None:
    """Give every BatchNorm of ``net`` running statistics and an affine as a trained net has them."""
    generator = torch.Generator().manual_seed(seed)
    for module in net.modules():
        if not is_batch_norm(module) or module.running_mean is None:
            continue
        n = module.running_mean.numel()
        module.running_mean.copy_(0.3 * torch.randn(n, generator=generator))
        module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
        if getattr(module, "weight", None) is not None:
            module.weight.copy_(0.5 + torch.rand(n, generator=generator))
            module.bias.copy_(0.3 * torch.randn(n, generator=generator))


@torch.no_grad()
def forced_prune_check(
    net: nn.Module,
    example,
    layers: int = 4,
    trained_norms: bool = True,
    output_key=None,
    heads: bool = False,
    **model_options,
) -> ForcedPrune:
    """Run the forced-prune check on a copy of ``net`` with the batch ``example`` (see the module docstring);
    ``heads=True`` also puts the value rows of every other head of each attention module whose heads are units
    at the prior's point (a head's output channels). ``model_options`` go to
    :class:`~pyrozoo.models.BayesianModel` (``random=[nn.BatchNorm2d]``, ...)."""
    import copy

    from pyrozoo.bmr.prune import reduce
    from pyrozoo.bmr.rebuild import parameter_count, rebuild
    from pyrozoo.bmr.units import structure
    from pyrozoo.guides import make_guide
    from pyrozoo.init_from import start_from_weights
    from pyrozoo.models import BayesianModel

    net = copy.deepcopy(net).eval()
    if trained_norms:
        train_like_norms(net)
    model = BayesianModel(net, example_input=example, output_key=output_key, **model_options).eval()
    guide = make_guide("meanfield", model)
    start_from_weights(model, guide, model.net, init_scale=1e-3, steps=0)  # the net's weights, confident
    chosen = [layer for layer in model.layers if layer.prunable and not layer.is_output and layer.rows > 1]
    chosen = chosen[:layers] + _first_producer(model, chosen[:layers], chosen[layers:])
    forced = 0
    for layer in chosen:
        loc, scale = guide.site_posterior(layer.site)
        rows = torch.arange(layer.rows, device=loc.device) % 2 == 0  # half the channels: every other one
        forced += int(rows.sum())
        at_point = rows[:, None].expand_as(loc)
        guide.write_posterior(layer.site, torch.where(at_point, 0.0, loc), scale)
    head_groups = [units for units in structure(model).units if units.heads_of is not None] if heads else []
    sites = {layer.name: layer.site for layer in model.layers}
    for units in head_groups:
        for member in units.producers:
            site = sites[member.layer]
            loc, scale = guide.site_posterior(site)
            loc = loc.clone()
            member.put(loc, torch.arange(units.count) % 2 == 0, 0.0)
            guide.write_posterior(site, loc, scale)
    reduce(model, guide, "threshold", units=True)
    expected = model.logits(example, model.weights_from(guide.mean()))
    dense = rebuild(model, guide, remove_dead=False)
    sparse = rebuild(model, guide)
    args, kwargs = call_arguments(example)
    got = select_output(sparse(*args, **kwargs), output_key)
    scale = max(float(expected.abs().max()), 1.0)
    difference = float((got - expected).abs().max()) / scale if got.shape == expected.shape else float("inf")
    same = got.shape == expected.shape and bool(torch.equal(got.argmax(-1), expected.argmax(-1)))
    try:
        torch.export.export(sparse, args, kwargs)
        export = ""
    except Exception as e:  # any failure of the exporter is the finding, in one line
        export = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    removed = sum(layer.rows - _rows(sparse, layer) for layer in chosen)
    forced_heads = sum((units.count + 1) // 2 for units in head_groups)
    removed_heads = sum(
        units.count - _head_count(sparse.get_submodule(units.heads_of)) for units in head_groups
    )
    return ForcedPrune(
        parameter_count(dense),
        parameter_count(sparse),
        difference,
        same,
        export,
        forced,
        removed,
        forced_heads,
        removed_heads,
    )


# A net over this many parameters is not checked: the Bayesian model and the rebuilt nets hold several copies.
MAX_PARAMETERS = 30_000_000
# Small members of timm's four families, with the options that make them take 32x32 input (ViTs: 4x4 patches).
_VIT_AT_32 = {"img_size": 32, "patch_size": 4}
TIMM_NETS = {
    **dict.fromkeys(("resnet10t", "resnet18", "resnet18d", "resnet26", "resnet34"), {}),
    **dict.fromkeys(("efficientnet_b0", "efficientnet_b1", "efficientnet_lite0", "efficientnet_es"), {}),
    # not ConvNeXt-V2: its GlobalResponseNorm divides each channel by a mean over all channels, so after every
    # LayerNorm, and in every block's MLP, no channel can go without changing the others
    **dict.fromkeys(("convnext_atto", "convnext_femto", "convnext_pico"), {}),
    **dict.fromkeys(("vit_tiny_patch16_224", "vit_small_patch16_224"), _VIT_AT_32),
}


def zoo_names() -> list[str]:
    """Every torchvision classification model (``tv:NAME``) and the timm nets of :data:`TIMM_NETS`."""
    import torchvision

    return [f"tv:{name}" for name in torchvision.models.list_models(module=torchvision.models)] + [
        f"timm:{name}" for name in TIMM_NETS
    ]


def _build(name: str, device=None) -> nn.Module:
    library, _, model = name.partition(":")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if library == "tv":
            import torchvision

            return torchvision.models.get_model(model, weights=None, num_classes=10)
        if library == "timm" and model in TIMM_NETS:
            import timm

            return timm.create_model(model, pretrained=False, num_classes=10, **TIMM_NETS[model])
    raise ValueError(f"unknown net {name!r}: tv:NAME or timm:NAME of {sorted(TIMM_NETS)}")


def parameters_of(name: str) -> int:
    """How many parameters the net ``name`` has, counted without allocating them where torch allows."""
    try:
        net = _build(name, "meta")
    except Exception:  # a builder that computes with tensors (regnet's widths) needs real ones: left empty
        with _no_init():
            net = _build(name)
    return sum(p.numel() for p in net.parameters())


@contextlib.contextmanager
def _no_init():
    """``torch.nn.init``'s in-place initialisers do nothing: a large net's parameters stay untouched (empty)
    memory."""
    names = [name for name in dir(nn.init) if name.endswith("_") and not name.startswith("_")]
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def prepare(name: str, max_parameters: int = MAX_PARAMETERS) -> tuple[nn.Module, torch.Tensor] | str:
    """The net ``name`` of :func:`zoo_names` (seeded) and an example batch of two 32x32 RGB images, or why it
    is not checked: over ``max_parameters`` parameters, or no forward pass at 32x32."""
    count = parameters_of(name)
    if count > max_parameters:
        return f"{count:,} parameters, over {max_parameters:,}"
    torch.manual_seed(0)
    net, example = _build(name).eval(), torch.randn(2, 3, 32, 32)
    try:
        with torch.no_grad():
            net(example)
    except Exception as e:  # the net itself does not take 32x32 input
        return f"does not run at 32x32 ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
    return net, example


def _first_producer(model, chosen: list, rest: list) -> list:
    """``[the first layer of rest whose rows make a removable group's units]`` where none of ``chosen``'s do
    (every group of the first layers is fixed, as Swin's are), else ``[]``. Attention heads do not count:
    a head has many value rows, so every other row pruned leaves every head alive (``heads=True`` forces
    them)."""
    from pyrozoo.bmr.units import structure

    producers = {m.layer for u in structure(model).units if u.heads_of is None for m in u.producers}
    if any(layer.name in producers for layer in chosen):
        return []
    return [layer for layer in rest if layer.name in producers][:1]


def _head_count(attention: nn.Module) -> int:
    """An attention module's head count: timm's ``num_heads``, Hugging Face's ``num_attention_heads``."""
    return getattr(attention, "num_heads", getattr(attention, "num_attention_heads", 0))


def tiny_bert(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A tiny Hugging Face ``BertForSequenceClassification`` (2 layers of 4 heads of width 8, 3 classes, a
    vocabulary of 50; built from its config, no hub) and two sequences of 8 tokens; its logits are
    ``output_key="logits"``. Needs ``transformers``."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(config).eval(), torch.randint(0, 50, (2, 8))


def _rows(net: nn.Module, layer) -> int:
    """The rows (output channels) ``layer`` has in ``net``."""
    weight = net.get_parameter(layer.weight_name)
    return weight.shape[1] if layer.transposed else weight.shape[0]
