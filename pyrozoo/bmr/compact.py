"""Compaction during training (issue 17): the units a BMR pass has killed are cut out of the running model.

After a pass, every group of units (:mod:`pyrozoo.bmr.units`) whose units are gone under the effective masks
(dead or unused) loses them, physically: from the net (its placeholder parameters and the modules' sizes, an
attention module's head count), the Bayesian model's layers and masks, the guide's parameters and the
optimiser's state (every per-parameter tensor shaped like its parameter: Adam's and AdaBelief's moments; IVON's
per-layer Hessian and momentum, which its posterior resizes with its weights). The
function the model computes and every surviving entry's posterior and optimiser state are exactly what they
were; the KL terms of the removed entries, which nothing that remains depends on, leave the ELBO.

Bookkeeping keeps speaking of the original architecture: ``model.kept`` holds, per compacted layer, the original
row and column indices of its latent that survive. A checkpoint stores them; a resumed run rebuilds the
compacted shapes from them (:func:`compact_to`) before loading the state; :func:`expand` grows a compacted
model and guide back to the original shapes (removed entries pruned, at the prior) for the export and the
rebuild, which then cut exactly the units the uncompacted twin's would.

As :func:`~pyrozoo.bmr.units.remove_dead_units`, a group whose units all went keeps its first one, so that its
layers stay valid modules. Groups that pass through deterministic per-channel modules (BatchNorm), or whose
layers are not Linear, Conv or Embedding modules (RNNs, MultiheadAttention), are left as they are. Each
compaction is checked first on a copy of the model: the outputs at the posterior mean on the example batch
must be the same; if they are not (or the copy cannot be made smaller), nothing is cut and the reason is
returned. Torch-Pruning (which the rebuild uses) is not used here: it prunes modules, while compaction must
also slice latents, masks, guide parameters and optimiser moments with the same indices, and keep the
optimiser's parameters.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from pyrozoo.bmr.units import (
    Member,
    Structure,
    Units,
    _same,
    effective_masks,
    fix_head_count,
    structure,
    _STRUCTURES,
)
from pyrozoo.models.bayesian import _buffer_name
from pyrozoo.models.layers import CONV_TRANSPOSE, Layer


class CannotCompact(Exception):
    """Why a model, guide or optimiser cannot be compacted (a one-line reason)."""


def kept_indices(model, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The original row and column indices of layer ``name``'s latent that the model holds now."""
    if name in model.kept:
        return model.kept[name]
    rows, cols = model.full_shapes[name]
    return torch.arange(rows), torch.arange(cols)


def _move(tensor: torch.Tensor, axis: int, current: torch.Tensor, target: torch.Tensor, full: int, fill):
    """``tensor`` holding original indices ``current`` along ``axis`` made to hold ``target`` instead; indices
    it does not hold are ``fill``."""
    if current.numel() == target.numel() and torch.equal(current, target):
        return tensor
    where = torch.full((full,), -1, dtype=torch.long)
    where[current] = torch.arange(current.numel())
    source = where[target]
    present = source >= 0
    shape = list(tensor.shape)
    shape[axis] = target.numel()
    if bool(present.all()):
        return tensor.index_select(axis, source.to(tensor.device)).clone()
    out = tensor.new_full(shape, fill)
    out.index_copy_(
        axis,
        present.nonzero().flatten().to(tensor.device),
        tensor.index_select(axis, source[present].to(tensor.device)),
    )
    return out


class _Resize:
    """Moves latent-shaped tensors (and the sites of a layer's prior that broadcast against its latent) from the
    indices a model holds to ``target`` (``{layer: (rows, cols)}`` original indices)."""

    def __init__(self, model, target: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.model, self.target = model, target
        self.layers = {layer.name: layer for layer in model.layers}

    def layer_tensor(self, name: str, tensor: torch.Tensor, fill=0.0) -> torch.Tensor:
        rows, cols = kept_indices(self.model, name)
        new_rows, new_cols = self.target.get(name, (rows, cols))
        full_rows, full_cols = self.model.full_shapes[name]
        tensor = _move(tensor, 0, rows, new_rows, full_rows, fill)
        return _move(tensor, 1, cols, new_cols, full_cols, fill)

    def site(self, site: str, tensor: torch.Tensor, fill=0.0) -> torch.Tensor:
        """A guide's tensor of latent ``site``, moved with its layer's."""
        owner = site.rpartition(".")[0]
        if owner not in self.target or owner not in self.layers:
            return tensor
        layer = self.layers[owner]
        if site == layer.site:
            return self.layer_tensor(owner, tensor, fill)
        # a prior's own latent (a layer's precision, a horseshoe's per-row scales): scalars and vectors hold no
        # row of the latent; a tensor broadcasting against it (rows, 1 or columns, ...) moves with it
        if tensor.dim() < 2:
            return tensor
        rows, cols = kept_indices(self.model, owner)
        if tensor.shape[0] != rows.numel() or tensor.shape[1] not in (1, cols.numel()):
            raise CannotCompact(
                f"latent {site!r} of shape {tuple(tensor.shape)} does not follow {owner}'s rows"
            )
        new_rows, new_cols = self.target[owner]
        full_rows, full_cols = self.model.full_shapes[owner]
        tensor = _move(tensor, 0, rows, new_rows, full_rows, fill)
        if tensor.shape[1] != 1:
            tensor = _move(tensor, 1, cols, new_cols, full_cols, fill)
        return tensor


def _weight_shape(layer: Layer, rows: int, columns: int) -> torch.Size:
    fan_in = columns - int(layer.has_bias)
    s = layer.weight_shape
    if layer.kind == "tensor" and len(s) != 2 and (rows, fan_in) != (layer.rows, layer.fan_in):
        raise CannotCompact(f"free parameter {layer.name!r} of shape {tuple(s)}")
    if len(s) <= 2:
        return torch.Size((fan_in, rows) if layer.transposed else (rows, fan_in))
    kernel = math.prod(s[2:])
    if fan_in % kernel:
        raise CannotCompact(f"layer {layer.name!r}: {fan_in} inputs do not fill its kernel of {kernel}")
    return torch.Size(
        (fan_in // kernel, rows, *s[2:]) if layer.transposed else (rows, fan_in // kernel, *s[2:])
    )


def _set_parameter(net: nn.Module, old: nn.Parameter, new: nn.Parameter) -> None:
    """Put ``new`` wherever ``old`` is held (tied weights stay tied)."""
    for module in net.modules():
        for key, value in module._parameters.items():
            if value is old:
                module._parameters[key] = new


def _fix_sizes(module: nn.Module, layer: Layer) -> None:
    """The size attributes of a module whose parameters changed shape."""
    weight = module.weight
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = weight.shape
    elif isinstance(module, CONV_TRANSPOSE):
        module.in_channels, module.out_channels = weight.shape[0], weight.shape[1] * module.groups
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if module.groups != 1:
            raise CannotCompact(f"grouped convolution {layer.name!r}")
        module.out_channels, module.in_channels = weight.shape[0], weight.shape[1]
    elif isinstance(module, nn.Embedding):
        module.num_embeddings, module.embedding_dim = weight.shape
    else:
        raise CannotCompact(f"layer {layer.name!r} of type {type(module).__name__}")


def _resize_model(model, target: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Make ``model`` (net, layers, masks) hold the original indices ``target`` of the layers named there."""
    resize = _Resize(model, target)
    layers = []
    for layer in model.layers:
        if layer.name not in target:
            layers.append(layer)
            continue
        if layer.weight_param is not None and layer.kind != "tensor":
            raise CannotCompact(f"layer {layer.name!r} is part of a module pyrozoo does not resize")
        weights = resize.layer_tensor(layer.name, layer.join(model.net))
        new = dataclasses.replace(layer, weight_shape=_weight_shape(layer, *weights.shape))
        for name, value in new.split(weights).items():
            old = model.net.get_parameter(name)
            _set_parameter(model.net, old, nn.Parameter(value.contiguous().clone(), requires_grad=False))
        if layer.kind != "tensor":
            _fix_sizes(model.net.get_submodule(layer.name), layer)
        mask = resize.layer_tensor(layer.name, model.mask(layer.name))
        model.masks.register_buffer(_buffer_name(layer.name), mask)
        layers.append(new)
    model._layers = layers
    for name, (rows, cols) in target.items():
        full_rows, full_cols = model.full_shapes[name]
        if rows.numel() == full_rows and cols.numel() == full_cols:
            model.kept.pop(name, None)
        else:
            model.kept[name] = (rows.clone(), cols.clone())
    model._find_pruned()


def _fix_heads(model, groups: list[Units]) -> None:
    """An attention module's head count follows its layers' rows."""
    for units in groups:
        if units.heads_of is not None:
            fix_head_count(model.net.get_submodule(units.heads_of))


def _remap(found: Structure, keeps: dict[str, list[torch.Tensor]]) -> Structure:
    """The groups with the units cut by ``keeps`` (per layer, boolean keep per row and per column) removed and
    their indices renumbered."""
    units = []
    for group in found.units:
        first = group.members[0]
        axis_keep = keeps.get(first.layer)
        survive = (
            torch.ones(group.count, dtype=torch.bool)
            if axis_keep is None
            else axis_keep[first.axis][first.index[:, 0]]
        )
        members = []
        for member in group.members:
            keep = keeps.get(member.layer)
            if keep is None:
                members.append(member)
                continue
            keep = keep[member.axis]
            if not torch.equal(keep[member.index], survive[:, None].expand_as(member.index)):
                raise CannotCompact(f"group {group.name!r} would lose part of a unit")
            position = keep.long().cumsum(0) - 1
            members.append(
                Member(member.layer, member.axis, position[member.index[survive]], member.produces)
            )
        units.append(dataclasses.replace(group, count=int(survive.sum()), members=tuple(members)))
    return Structure(units, found.fixed, found.stayed)


def _cuts(model) -> tuple[dict[str, list[torch.Tensor]], int, list[str]]:
    """Per layer, which rows and columns of its latent stay (boolean); how many units go; groups left alone."""
    masks = effective_masks(model)
    keeps: dict[str, list[torch.Tensor]] = {}
    removed, skipped = 0, []
    for units in structure(model).units:
        gone = units.gone(masks).cpu()
        if bool(gone.all()):
            gone[0] = False  # as the rebuild: a group keeps one unit, so that its layers stay valid modules
        if not bool(gone.any()):
            continue
        if units.passthrough:
            skipped.append(f"{units.name} (through {', '.join(units.passthrough)})")
            continue
        if units.channels is not None:
            skipped.append(f"{units.name} (a grouped convolution)")
            continue
        removed += int(gone.sum())
        for member in units.members:
            keep = keeps.setdefault(
                member.layer, [torch.ones(s, dtype=torch.bool) for s in masks[member.layer].shape]
            )
            keep[member.axis][member.index[gone].flatten()] = False
    return keeps, removed, skipped


def _target(model, keeps: dict[str, list[torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    target = {}
    for name, (row_keep, col_keep) in keeps.items():
        rows, cols = kept_indices(model, name)
        target[name] = (rows[row_keep], cols[col_keep])
    return target


def _outputs(model, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model.logits(model.example_input(), weights)
    finally:
        model.train(training)


def _resize_guide(guide, resize: _Resize) -> dict[nn.Parameter, tuple[nn.Parameter, str]]:
    if not callable(getattr(guide, "resize", None)):
        raise CannotCompact(
            f"the {type(guide).__name__} guide cannot be compacted (the meanfield and ivon guides can): run "
            "with --no-compact"
        )
    return guide.resize(resize.site)


def _resize_optimizer(optimizer, moved: dict, resize: _Resize) -> None:
    """Replace the moved parameters in ``optimizer`` and move their state with them: every tensor shaped like
    its parameter (moments) is resized as the parameter was; the rest (step counts) is kept."""
    for group in optimizer.param_groups:
        group["params"] = [moved[p][0] if p in moved else p for p in group["params"]]
    for old, (new, site) in moved.items():
        if old not in optimizer.state:
            continue
        state = optimizer.state.pop(old)
        optimizer.state[new] = {
            key: (
                resize.site(site, value)
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == old.shape
                else value
            )
            for key, value in state.items()
        }


def compactable(guide) -> str | None:
    """Why ``guide`` cannot be compacted, or None when it can."""
    if callable(getattr(guide, "resize", None)):
        return None
    return f"the {type(guide).__name__} guide cannot be compacted (the meanfield and ivon guides can)"


@torch.no_grad()
def compact(model, guide, optimizer=None) -> tuple[int, str]:
    """Cut every unit that is gone (dead or unused under the effective masks) out of ``model``, ``guide`` and
    ``optimizer``, in place; returns how many units went and a note (why some or all were left, or "")."""
    why = compactable(guide)
    if why:
        return 0, why
    keeps, removed, skipped = _cuts(model)
    note = f"left uncompacted: {'; '.join(skipped)}" if skipped else ""
    if not removed:
        return 0, note
    found = structure(model)
    try:
        remapped = _remap(found, keeps)
        target = _target(model, keeps)
        # the check, on a copy: the same outputs at the posterior mean, from the smaller model
        weights = model.weights_from(guide.mean())
        before = _outputs(model, weights)
        trial = copy.deepcopy(model)
        resize = _Resize(model, target)
        small = {name: resize.layer_tensor(name, w) for name, w in weights.items() if name in target}
        _resize_model(trial, target)
        _fix_heads(trial, found.units)
        after = _outputs(trial, {**weights, **small})
        if not _same(after, before):
            return 0, "compaction would change the outputs; nothing was cut"
    except (CannotCompact, RuntimeError) as e:  # a module the copy cannot shrink: train on as it is
        return 0, f"cannot compact ({e})"
    _apply(model, guide, optimizer, target)
    _STRUCTURES[model] = remapped
    return removed, note


def _apply(model, guide, optimizer, target) -> None:
    resize = _Resize(model, target)  # built before the model changes: it moves from the indices held now
    groups = structure(model).units
    moved = _resize_guide(guide, resize)
    if optimizer is not None:
        _resize_optimizer(optimizer, moved, resize)
    _resize_model(model, target)
    _fix_heads(model, groups)


@torch.no_grad()
def compact_to(model, guide, optimizer, kept: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Make a full model, guide and optimiser hold the original indices ``kept`` (as a checkpoint stores them),
    before their state is loaded: the shapes of a compacted run."""
    if not kept:
        return
    why = compactable(guide)
    if why:
        raise CannotCompact(why)
    found = structure(model)  # traced on the full net: the original groups
    keeps = {}
    for name, (rows, cols) in kept.items():
        full_rows, full_cols = model.full_shapes[name]
        keeps[name] = [torch.zeros(n, dtype=torch.bool) for n in (full_rows, full_cols)]
        keeps[name][0][rows] = True
        keeps[name][1][cols] = True
    remapped = _remap(found, keeps)
    _apply(model, guide, optimizer, {name: (r.clone(), c.clone()) for name, (r, c) in kept.items()})
    _STRUCTURES[model] = remapped


@torch.no_grad()
def expand(model, guide):
    """Copies of a compacted ``model`` and ``guide`` grown back to the original shapes, the removed entries
    pruned and at the prior: what the export and the rebuild of the uncompacted run work on."""
    if not model.kept:
        return model, guide
    heads = structure(model).units
    model, guide = copy.deepcopy(model), copy.deepcopy(guide)
    target = {}
    for name in model.kept:
        rows, cols = model.full_shapes[name]
        target[name] = (torch.arange(rows), torch.arange(cols))
    resize = _Resize(model, target)
    guide.resize(resize.site)
    _resize_model(model, target)
    _fix_heads(model, heads)
    _STRUCTURES.pop(model, None)  # traced afresh on the full net
    return model, guide
