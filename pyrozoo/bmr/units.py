"""Units (channels, neurons, embedding dimensions, attention heads) and the groups they couple into.

A *group* (:class:`Units`) is a set of ``count`` units that go together: for each unit, a set of entries of
random latents, as a list of memberships ``(layer, axis, index)`` with ``index[u]`` the unit's rows (axis 0)
or columns (axis 1) of that layer's latent. Memberships that *produce* the unit's value (a conv's output rows,
an embedding's columns) are told apart from those that *consume* it (the next layers' input columns). The same
representation slices masks, posterior parameters and optimiser state alike (:func:`slice_latents`), so it can
drive compaction during training as well as the rebuild.

Where the groups come from:

- **Torch-Pruning's DependencyGraph** (``torch-pruning`` on PyPI, the DepGraph paper) traces the net on an
  example batch and couples channels through residual additions, BatchNorm, depthwise convolutions,
  concatenations, flattening and 1x1-conv or linear MLPs. Each of its groups (rooted at a layer's output
  channels) becomes one :class:`Units`. A group whose channels pass through an operation that mixes channels
  (LayerNorm, GroupNorm, softmax, matrix products, attention) or reach a deterministic weight layer, an RNN's
  hidden state or the output layer's rows is *fixed*: removing one of its units could change the function.
- **Attention heads** are found by hand: the DependencyGraph tracks features, not heads, and a head is the unit
  whose value rows decide whether it contributes. Known layouts: timm's ``Attention`` (fused ``qkv`` and
  ``proj``), and Hugging Face's with separate query, key and value layers of one head per query head: BERT's
  (``query``, ``key``, ``value``, the parent's ``output.dense``) and transformers 5's ViT (``q_proj`` ...
  ``o_proj``). Cutting a head removes its query, key and value rows and its output projection's columns, and
  sets the module's head count (``num_heads``; ``num_attention_heads`` and ``all_head_size``).

A per-channel affine after a unit (BatchNorm, random or deterministic) is sliced with the group; a random,
prunable one's rows are among its producers. A grouped convolution couples the channels at one position of every
group into one unit (:attr:`Units.channels`). Why a group is fixed is said in words, not autograd node names.

A unit is *removable without changing the function* when all its consuming entries are pruned (unused), or when
all its producing entries are pruned and the path to its consumers maps 0 to 0 (dead: ReLU, GELU, SiLU, tanh,
pooling, additions of dead channels). A *silent* unit (producers pruned, but a BatchNorm shift or sigmoid(0)
after them) outputs a constant: the rebuild (:func:`remove_dead_units`) cuts it where the constant folds exactly
into its consumers (:mod:`pyrozoo.bmr.fold`) and says in :attr:`Structure.stayed` why it stays elsewhere. The
rebuild also checks each group's removal against the unpruned net's outputs on the example batch and keeps the
units if they differ.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from pyrozoo.bmr.fold import apply_folds, plan_folds
from pyrozoo.errors import PyrozooError
from pyrozoo.models.bayesian import call_arguments, select_output
from pyrozoo.models.layers import Layer, find_layers, is_batch_norm


@dataclass(frozen=True)
class Member:
    """The entries of one random layer's latent that belong to each unit of a group."""

    layer: str  # a Layer's name
    axis: int  # 0: rows of the latent; 1: columns
    index: torch.Tensor  # (count, k): unit u holds index[u] along axis
    produces: bool  # True: these entries make the unit's value; False: they consume it

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        """Per unit, its entries of a latent-shaped ``tensor``: ``(count, k * other axis)``."""
        index = self.index.to(tensor.device)
        if self.axis == 0:
            return tensor[index].flatten(1)
        return tensor[:, index].permute(1, 0, 2).flatten(1)

    def put(self, tensor: torch.Tensor, units: torch.Tensor, value) -> None:
        """Set the entries of ``units`` (boolean, per unit) of ``tensor`` to ``value`` in place."""
        index = self.index.to(tensor.device)[units.to(tensor.device)].flatten()
        if self.axis == 0:
            tensor[index] = value
        else:
            tensor[:, index] = value


@dataclass(frozen=True)
class Units:
    """``count`` coupled units: their memberships in random layers (see the module docstring)."""

    name: str  # the root module's path (or the attention module's, for heads)
    count: int
    members: tuple[Member, ...]
    zero_preserving: bool = True  # all producing entries pruned -> consumers see exactly 0
    heads_of: str | None = None  # path of the attention module whose head count shrinks
    passthrough: tuple[str, ...] = field(
        default=()
    )  # deterministic modules sliced with the units (BatchNorm)
    channels: torch.Tensor | None = None  # (count, k): the root's channels of each unit, where not one each

    @property
    def producers(self) -> list[Member]:
        return [m for m in self.members if m.produces]

    @property
    def consumers(self) -> list[Member]:
        return [m for m in self.members if not m.produces]

    @property
    def layers(self) -> set[str]:
        return {m.layer for m in self.members}

    def _none(self, masks: dict[str, torch.Tensor], members: list[Member]) -> torch.Tensor:
        device = next(iter(masks.values())).device
        out = torch.ones(self.count, dtype=torch.bool, device=device)
        for member in members:
            out &= ~member.take(masks[member.layer]).any(dim=1)
        return out

    def silent(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Units whose producing entries before their per-channel affine (a random BatchNorm's rows, which
        leave a constant) are all pruned: they output a constant (exactly 0 where :meth:`dead`)."""
        producers = [m for m in self.producers if m.layer not in self.passthrough] or self.producers
        if not producers:
            return torch.zeros(self.count, dtype=torch.bool, device=next(iter(masks.values())).device)
        return self._none(masks, producers)

    def dead(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Units whose producing entries are all pruned and whose consumers therefore see 0."""
        if not self.zero_preserving or not self.producers:
            return torch.zeros(self.count, dtype=torch.bool, device=next(iter(masks.values())).device)
        return self._none(masks, self.producers)

    def unused(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Units whose consuming entries are all pruned."""
        return self._none(masks, self.consumers)

    def gone(self, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Units that can go without changing the function: dead or unused."""
        return self.dead(masks) | self.unused(masks)

    def total(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per unit, the sum of ``values`` (latent-shaped, e.g. dF with pruned entries at 0) over its entries."""
        return sum(member.take(values[member.layer]).sum(dim=1) for member in self.members)

    def remove(self, masks: dict[str, torch.Tensor], units: torch.Tensor) -> None:
        """Mark every entry of ``units`` (boolean, per unit) pruned in the boolean ``masks``, in place."""
        for member in self.members:
            member.put(masks[member.layer], units, False)


def slice_latents(
    units: Units, keep: torch.Tensor, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Latent-shaped ``tensors`` (masks, guide locs and scales, optimiser moments) of the group's layers with the
    entries of the units not in ``keep`` cut out along each membership's axis: the compaction of a group."""
    out = dict(tensors)
    for member in units.members:
        if member.layer not in out:
            continue
        tensor = out[member.layer]
        index = member.index.to(tensor.device)
        dropped = index[~keep.to(tensor.device)].flatten()
        size = tensor.shape[member.axis]
        kept = torch.ones(size, dtype=torch.bool, device=tensor.device)
        kept[dropped] = False
        out[member.layer] = tensor[kept] if member.axis == 0 else tensor[:, kept]
    return out


# --- finding groups ---------------------------------------------------------------------------------------

# Operations (autograd node names as the DependencyGraph records them) that mix a channel with the others: a
# unit passing through one cannot be removed without changing what the others compute.
_MIXING = ("LayerNorm", "GroupNorm", "Softmax", "Mm", "Bmm", "Matmul", "Attention", "Var", "Std", "Norm")
# Operations that map a channel of zeros to zeros (with every other input of the unit zero too).
_MIXING_WORDS = {
    "Attention": "attention (a scaled dot-product)",
    "LayerNorm": "a layer normalisation",
    "GroupNorm": "a group normalisation",
    "Softmax": "a softmax",
    "Mm": "a matrix product",
    "Matmul": "a matrix product",
    "Var": "a variance over channels",
    "Std": "a standard deviation over channels",
    "Norm": "a norm over channels",
}


def _mixing_words(op: str) -> str:
    """An autograd node's name (``ScaledDotProductFlashAttentionForCpuBackward0``) in a user's words."""
    return next((words for key, words in _MIXING_WORDS.items() if key in op), "an operation")


@dataclass(frozen=True)
class Pass:
    """A per-channel module (BatchNorm) that a group's units pass through: sliced with them at the rebuild,
    with its random rows (if any) among the group's producers."""

    members: list


@dataclass(frozen=True)
class Grouped:
    """A grouped convolution's memberships: its groups hold ``size`` channels each, and a unit must lose the
    same position in every group (channels ``j, j + size, j + 2 size, ...`` go together)."""

    size: int
    members: list


_ZERO_TO_ZERO = (
    "Relu", "Gelu", "Silu", "Tanh", "Hardswish", "Hardtanh", "LeakyRelu", "Elu", "Mish", "Add", "Sub", "Mul",
    "Div", "Mean", "Sum", "Pool", "View", "Reshape", "Permute", "Transpose", "Unsqueeze", "Squeeze", "Flatten",
    "Clone", "Cat", "Split", "Slice", "Select", "Unbind", "Expand", "TBackward", "Index", "Contiguous",
    "Dropout", "Pad", "Chunk", "Stack", "Narrow", "Identity", "Alias",
)  # fmt: skip


def _timm_attention(module: nn.Module, children: dict) -> bool:
    return (
        isinstance(children.get("qkv"), nn.Linear)
        and isinstance(children.get("proj"), nn.Linear)
        and isinstance(children.get("norm", nn.Identity()), nn.Identity)
        and getattr(module, "gate", None) is None
        and hasattr(module, "num_heads")
        and hasattr(module, "head_dim")
        and children["qkv"].out_features == 3 * module.num_heads * module.head_dim
    )


# Hugging Face's attention layouts: the head width's attribute -> the query, key and value layers' names.
# BERT's (and RoBERTa's, ELECTRA's, ...) output projection is its parent's ``output.dense``; the other layout's
# (ViT's in transformers 5, Llama's, ...) is its own ``o_proj``.
_HF_LAYOUTS = {"attention_head_size": ("query", "key", "value"), "head_dim": ("q_proj", "k_proj", "v_proj")}


def _hf_layers(module: nn.Module) -> dict[str, str] | None:
    """``{"query": name, "key": name, "value": name}`` of a Hugging Face attention module: separate Linear
    layers of ``num_attention_heads`` heads of its head width each (a key and a value head per query head);
    None for any other module."""
    heads = getattr(module, "num_attention_heads", None)
    for size_name, names in _HF_LAYOUTS.items():
        size = getattr(module, size_name, None)
        if not isinstance(heads, int) or not isinstance(size, int):
            continue
        linears = [getattr(module, name, None) for name in names]
        if all(isinstance(m, nn.Linear) and m.out_features == heads * size for m in linears):
            return dict(zip(("query", "key", "value"), names))
    return None


def _head_width(module: nn.Module) -> int:
    """A Hugging Face attention module's head width (BERT's ``attention_head_size``, else ``head_dim``)."""
    return getattr(module, "attention_head_size", getattr(module, "head_dim", 0))


def _hf_output(parent: nn.Module, attention: nn.Module) -> tuple[str, nn.Linear] | None:
    """A Hugging Face attention module's output projection (it takes the heads' values side by side), with its
    path from ``parent``: its own ``o_proj``, or its parent's ``output.dense`` (``BertSelfOutput``); None where
    there is no such layer."""
    width = attention.num_attention_heads * _head_width(attention)
    own = getattr(attention, "o_proj", None)
    found = (
        ("o_proj", own)
        if own is not None
        else ("output.dense", getattr(getattr(parent, "output", None), "dense", None))
    )
    return found if isinstance(found[1], nn.Linear) and found[1].in_features == width else None


def _other_parameters(module: nn.Module, layers) -> bool:
    """Whether a Hugging Face attention module holds parameters besides its query, key, value (and own output)
    layers (a normalisation, BEiT's position bias per head), which pyrozoo does not cut with its heads."""
    own = {id(p) for name in layers for p in module.get_submodule(name).parameters()}
    return any(id(p) not in own for p in module.parameters())


def _attention_layers(net: nn.Module):
    """Each attention module whose heads pyrozoo knows how to cut: ``(path, module, layers)`` with ``layers``
    the paths of its layers by role: ``qkv`` and ``proj`` (timm's ``Attention``), or ``query``, ``key``,
    ``value`` and ``output`` (Hugging Face's, with no other parameters)."""
    for path, parent in net.named_modules():
        prefix = f"{path}." if path else ""
        if _timm_attention(parent, dict(parent.named_children())):
            yield path, parent, {role: prefix + role for role in ("qkv", "proj")}
        for name, child in parent.named_children():
            layers, output = _hf_layers(child), None
            if layers is not None:
                output = _hf_output(parent, child)
            if output is None:
                continue
            own = [*layers.values(), *([output[0]] if output[0] == "o_proj" else [])]
            if _other_parameters(child, own):
                continue
            found = {role: f"{prefix}{name}.{layer}" for role, layer in layers.items()}
            output_path = f"{prefix}{name}.o_proj" if output[0] == "o_proj" else f"{prefix}output.dense"
            yield f"{prefix}{name}", child, {**found, "output": output_path}


def _heads(net: nn.Module, by_name: dict[str, Layer]) -> list[Units]:
    """A group per attention module of :func:`_attention_layers` whose layers are all random: a unit per
    head, its value rows producing it (zero values: the head adds nothing), its query and key rows and its
    output projection's columns consuming it."""
    found = []
    for path, module, layers in _attention_layers(net):
        if not all(name in by_name for name in layers.values()):
            continue
        if "qkv" in layers:  # timm: one fused layer, rows ordered (q/k/v, head, d)
            heads, size = module.num_heads, module.head_dim
            qkv = torch.arange(3 * heads * size).reshape(3, heads, size).permute(1, 0, 2)  # (head, q/k/v, d)
            members = (
                Member(layers["qkv"], 0, qkv[:, 2], True),
                Member(layers["qkv"], 0, qkv[:, :2].flatten(1), False),
                Member(layers["proj"], 1, torch.arange(heads * size).reshape(heads, size), False),
            )
        else:  # Hugging Face: head h holds rows h * size ... (h + 1) * size - 1 of each layer
            heads, size = module.num_attention_heads, _head_width(module)
            per_head = torch.arange(heads * size).reshape(heads, size)
            members = (
                Member(layers["value"], 0, per_head, True),
                Member(layers["query"], 0, per_head, False),
                Member(layers["key"], 0, per_head, False),
                Member(layers["output"], 1, per_head, False),
            )
        found.append(Units(path, heads, members, True, heads_of=path))
    return found


def _fixed_heads(net: nn.Module, heads: list[Units]) -> dict[str, str]:
    """Why the heads of each attention module that :func:`_heads` did not take stay, by its path."""
    taken = {units.heads_of for units in heads}
    known = {path: layers for path, _, layers in _attention_layers(net)}
    modules, fixed = dict(net.named_modules()), {}
    for path, module in modules.items():
        count = getattr(module, "num_heads", getattr(module, "num_attention_heads", None))  # Hugging Face's
        if path in taken or not isinstance(count, int):
            continue
        kind = type(module).__name__
        if isinstance(module, nn.MultiheadAttention):
            why = "nn.MultiheadAttention needs as many attention channels as input channels"
        elif path in known:
            roles, which = (
                ("qkv or proj", "both")
                if "qkv" in known[path]
                else ("query, key, value or output", "all four")
            )
            why = f"its {roles} layer is deterministic (make {which} random to let heads go)"
        elif "Window" in kind:  # torchvision's and timm's Swin
            why = f"{kind} computes its head width from its input width and keeps a position bias per head"
        elif _hf_layers(module) is not None:
            why = (
                f"{kind} holds parameters besides its query, key, value and output layers, which pyrozoo does "
                "not cut with its heads (a normalisation, a position bias per head)"
                if _hf_output(modules.get(path.rpartition(".")[0]) if path else None, module) is not None
                else f"{kind} has no output projection pyrozoo can find (its own o_proj or its parent's "
                "output.dense)"
            )
        else:
            why = (
                "pyrozoo cuts the heads of timm's Attention (fused qkv, proj) and of Hugging Face's BERT- and "
                "ViT-style attention (separate query, key and value layers, a key and value head per query "
                f"head), not of {kind}"
            )
        fixed[path] = f"its {count} attention heads stay: {why}"
    return fixed


def fix_head_count(attention: nn.Module) -> None:
    """Set an attention module's head count, and the widths made from it, from its layers' sizes: after heads
    were cut out of them."""
    if hasattr(attention, "qkv"):  # timm's
        attention.num_heads = attention.qkv.out_features // (3 * attention.head_dim)
        if hasattr(attention, "attn_dim"):
            attention.attn_dim = attention.num_heads * attention.head_dim
    else:  # Hugging Face's: both are read in forward (older versions view by them, newer ones by -1)
        value = attention.value if hasattr(attention, "value") else attention.v_proj
        attention.num_attention_heads = value.out_features // _head_width(attention)
        if hasattr(attention, "all_head_size"):
            attention.all_head_size = attention.num_attention_heads * _head_width(attention)


def _example_on(example, device):
    if isinstance(example, dict):
        return {k: _example_on(v, device) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(_example_on(v, device) for v in example)
    return (
        example.to(device)
        if isinstance(example, torch.Tensor) and example.is_floating_point()
        else (example.to(device) if isinstance(example, torch.Tensor) else example)
    )


# Flattenings that map one channel group to more entries than this, together, are Torch-Pruning mistaking a
# reshape of a channels-last tensor (Swin's windows) for a flattening of channels: each further one multiplies
# the indices, until memory runs out. A real flattening into a Linear stays far below (VGG's 512 x 7 x 7 = 25,088).
_MAX_FLATTENED = 2**18


class _Unfollowable(ValueError):
    """A reshape whose channel mapping Torch-Pruning gets wrong (see :data:`_MAX_FLATTENED`)."""


@contextlib.contextmanager
def _tolerant_reshapes():
    """Torch-Pruning cannot map channels through a reshape that permutes them (ShuffleNet's channel shuffle) and
    fails with a ZeroDivisionError. While active, such a reshape is recorded in its graph's ``unmapped`` set
    instead, and every group that passes through it is fixed (:func:`find_structure`); a flattening whose
    indices run away raises :class:`_Unfollowable` instead of filling memory."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping
    flatten = index_mapping._FlattenIndexMapping.__call__

    def tolerant(graph, node):
        try:
            original(graph, node)
        except ZeroDivisionError:
            graph.__dict__.setdefault("unmapped", set()).add(node.module)

    flattened = [0]  # indices made by flattenings so far, in this group

    def bounded(mapping, idxs):
        if not mapping.reverse:
            flattened[0] += len(idxs) * mapping._stride
            if flattened[0] > _MAX_FLATTENED:
                raise _Unfollowable(f"{len(idxs)} channels flattened {mapping._stride}-fold")
        return flatten(mapping, idxs)

    index_mapping.update_reshape_index_mapping = tolerant
    index_mapping._FlattenIndexMapping.__call__ = bounded
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original
        index_mapping._FlattenIndexMapping.__call__ = flatten


def dependency_graph(net: nn.Module, example, output_key=None, ignored: list[nn.Module] = ()):
    """Torch-Pruning's DependencyGraph of ``net`` (in eval mode, so BatchNorm statistics stay as they are); every
    parameter of ``net`` is left requiring gradients."""
    import torch_pruning as tp

    args, kwargs = call_arguments(example)
    training = net.training
    net.eval()
    for p in net.parameters():  # the graph is traced through autograd: a layer without gradient is invisible
        p.requires_grad_(True)
    try:
        with torch.enable_grad(), _tolerant_reshapes():  # autograd records the graph, even under no_grad
            graph = tp.DependencyGraph().build_dependency(
                net,
                example_inputs=example,
                forward_fn=lambda model, _: select_output(model(*args, **kwargs), output_key),
                ignored_layers=list(ignored),
                verbose=False,
            )
    except Exception as e:  # tracing arbitrary user code: say what failed, in one line
        raise PyrozooError(f"cannot trace {type(net).__name__} to find its units ({type(e).__name__}: {e})")
    finally:
        net.train(training)
    return graph


def release(graph) -> None:
    """Free what a Torch-Pruning DependencyGraph no longer in use holds, now; it must not be used after. The
    graph and its nodes are a web of reference cycles holding the traced forward pass's autograd functions (their
    saved activations and weights), the traced net's modules and a map of its parameters, those a cut replaced
    too: a large net's whole weights per trace. Python's cyclic collector frees them only at its next full
    collection, which is rare in a process with many objects (and takes about a second where torch is loaded)."""
    for node in graph.module2node.values():
        for dep in node.dependencies:
            dep.__dict__.clear()
        node.__dict__.clear()
    graph.__dict__.clear()


@dataclass(frozen=True)
class _Trace:
    """A net's DependencyGraph and the look-ups that turn the graph's items into memberships."""

    graph: object  # Torch-Pruning's DependencyGraph
    module_path: dict  # module -> its path in the net
    by_name: dict[str, Layer]  # a Layer's name -> the Layer
    by_param: dict[int, str]  # id(parameter) -> its name (a random layer's name for its weight)
    pruning_dims: dict[int, int]  # id(unwrapped parameter) -> the dimension Torch-Pruning slices
    claimed: set[str]  # layers whose attention heads are units of their own


def _item_members(trace: _Trace, item):
    """Memberships of one DependencyGraph item, or a string saying why the group must stay fixed, or None for
    an item that holds no random entries and mixes nothing."""
    import torch_pruning as tp

    dep, idxs = item.dep, list(item.idxs)
    module, handler = dep.target.module, dep.handler
    roots = getattr(item, "root_idxs", None)
    if roots is None or any(r is None for r in roots):
        return "Torch-Pruning cannot follow its channels through an index mapping"
    out = trace.graph.is_out_channel_pruning_fn(handler)
    if isinstance(module, nn.Parameter):
        name = trace.by_param.get(id(module))
        if name is None:
            return "its channels reach a parameter pyrozoo does not know"
        layer = trace.by_name.get(name)
        if layer is None:
            return f"its channels reach deterministic parameter {name!r} (make it random to let them go)"
        if trace.pruning_dims.get(id(module)) != module.dim() - 1:
            return f"its channels reach parameter {name!r} along a dimension other than its last"
        return [(layer, 1, idxs, roots, True)]
    if isinstance(module, tp.ops._ElementWiseOp):
        op = str(module._grad_fn)
        if "BatchNorm" not in op and any(word in op for word in _MIXING):
            return f"its channels pass through {_mixing_words(op)}, which mixes them with the others"
        return None if any(word in op for word in _ZERO_TO_ZERO) else "constant"
    if module in trace.graph.__dict__.get("unmapped", ()):
        return "its channels pass through a reshape that permutes them (a channel shuffle)"
    if module.__class__.__module__.startswith("torch_pruning"):
        return None  # concatenation, split, reshape, ...: index mappings only
    path = trace.module_path.get(module)
    if is_batch_norm(module) or isinstance(module, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
        # a per-channel affine: sliced with the units. Random and prunable, its rows produce the unit with the
        # layer before it (all pruned: the unit outputs exactly 0); otherwise its shift is a constant that a
        # unit whose producers are all pruned still outputs, which the rebuild folds into the consumers
        layer = trace.by_name.get(path)
        if layer is not None and layer.prunable:
            return Pass([(layer, 0, idxs, roots, True)])
        return Pass([])
    if isinstance(module, nn.PReLU):
        return None if module.num_parameters == 1 else Pass([])  # per channel: sliced with the units
    return _module_members(trace, module, path, idxs, roots, out)


def _module_members(trace: _Trace, module: nn.Module, path: str, idxs: list, roots: list, out: bool):
    """As :func:`_item_members` for a module with weights of its own: a random layer's memberships, or why
    its channels cannot go (deterministic, tied, normalising, recurrent, attention or of a kind not sliced).
    """
    layer = trace.by_name.get(path)
    tied = trace.by_name.get(trace.by_param.get(id(getattr(module, "weight", None)), ""))
    if layer is None and tied is not None and isinstance(module, nn.Linear) and not out:
        if tied.kind == "embedding":  # a decoder sharing an embedding's matrix: its inputs are the columns
            return [(tied, 1, idxs, roots, False)]
        return f"its channels reach layer {path!r}, whose weight is tied to {tied.name!r}"
    if layer is None:
        kind = type(module).__name__
        if not any(True for _ in module.parameters(recurse=False)):
            return None
        return f"its channels reach deterministic layer {path!r} ({kind}; make it random to let them go)"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or layer.kind == "norm":
        return f"its channels pass through normalisation {path!r} ({type(module).__name__}), which mixes them"
    if isinstance(module, nn.Embedding):
        return (
            [(layer, 1, idxs, roots, True)]
            if out
            else f"its channels are the token indices of embedding {path!r}"
        )
    if isinstance(module, (nn.LSTM, nn.GRU, nn.RNN)):
        if out:
            return f"its channels are the hidden state of {path!r}, which feeds back into itself"
        names = [n for n in trace.by_name if n.startswith(f"{path}.weight_ih_l0")]
        return [(trace.by_name[n], 1, idxs, roots, False) for n in names]
    if isinstance(module, nn.MultiheadAttention):
        return f"its channels feed attention {path!r} (MultiheadAttention), whose heads mix them"
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, *_conv_transposes())):
        return (
            f"its channels reach layer {path!r} of type {type(module).__name__}, which pyrozoo cannot slice"
        )
    return _weight_members(module, layer, path, idxs, roots, out)


def _weight_members(module: nn.Module, layer: Layer, path: str, idxs: list, roots: list, out: bool):
    """A linear or (grouped, depthwise, transposed) convolution layer's memberships: the rows of its outputs
    or the columns of its inputs, :class:`Grouped` for a grouped convolution."""
    groups = getattr(module, "groups", 1)
    depthwise = groups == getattr(module, "in_channels", 0) == getattr(module, "out_channels", 0)
    if groups > 1 and not depthwise and (isinstance(module, _conv_transposes()) or list(idxs) != list(roots)):
        return f"grouped convolution {path!r} behind a reshuffle of its channels"
    if out:
        if layer.is_output:
            return f"its channels are the outputs of the output layer {path!r}"
        found = [(layer, 0, idxs, roots, True)]
        return found if groups == 1 or depthwise else Grouped(module.out_channels // groups, found)
    if depthwise:
        return None  # its input channel is its output channel, a row of its own
    if isinstance(module, nn.Linear):
        return [(layer, 1, idxs, roots, False)]
    size = module.in_channels // groups  # a grouped conv's column c % size serves channel c of every group
    kernel = layer.fan_in // size
    columns = [(channel % size) * kernel + k for channel in idxs for k in range(kernel)]
    found = [(layer, 1, columns, [r for r in roots for _ in range(kernel)], False)]
    return found if groups == 1 else Grouped(size, found)


def _conv_transposes():
    return (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _per_unit(indices: list[int], roots: list[int], count: int) -> torch.Tensor | None:
    """``(count, k)`` indices, unit by unit, or None when units hold different numbers of indices."""
    buckets: list[list[int]] = [[] for _ in range(count)]
    for index, root in zip(indices, roots):
        buckets[root].append(index)
    buckets = [sorted(set(b)) for b in buckets]  # an entry shared by a unit's channels counts once
    sizes = {len(b) for b in buckets}
    if len(sizes) != 1 or 0 in sizes:
        return None
    return torch.tensor(buckets, dtype=torch.long)


@dataclass(frozen=True)
class Structure:
    """Every group of a net: the removable ones (:attr:`units`) and why the others are fixed."""

    units: list[Units]
    fixed: dict[str, str]  # root path -> why its units cannot be removed
    # root path -> why units of a removable group stayed in the last rebuild although their weights are pruned
    stayed: dict[str, str] = field(default_factory=dict)


def find_structure(net: nn.Module, layers: list[Layer], example, output_key=None) -> Structure:
    """Trace ``net`` (a copy; BatchNorm statistics untouched) on ``example`` and group its units."""
    net = copy.deepcopy(net)
    by_name = {layer.name: layer for layer in layers}
    heads = _heads(net, by_name)
    graph = dependency_graph(net, _example_on(example, next(net.parameters()).device), output_key)
    try:
        return _grouped(net, layers, graph, heads)
    finally:
        release(graph)  # with it the copy of the net goes


def _grouped(net: nn.Module, layers: list[Layer], graph, heads: list[Units]) -> Structure:
    """:func:`find_structure`'s groups of ``net``, traced as ``graph``, given its attention ``heads``."""
    by_name = {layer.name: layer for layer in layers}
    by_param = {id(p): name for name, p in net.named_parameters()}
    for layer in layers:
        by_param.setdefault(id(net.get_parameter(layer.weight_name)), layer.name)
    trace = _Trace(
        graph,
        {module: path for path, module in net.named_modules()},
        by_name,
        by_param,
        {id(u.parameters): u.pruning_dim for u in graph.unwrapped_parameters},
        {m.layer for u in heads for m in u.members},
    )
    units, fixed = list(heads), _fixed_heads(net, heads)
    for group in _pruning_groups(trace, fixed):
        root = group[0].dep.target.module
        name = trace.module_path.get(root, str(root))
        found = _collect_members(trace, group)
        if not isinstance(found, str):
            found = _group_units(name, len(group[0].idxs), *found)
        if isinstance(found, str):
            fixed[name] = found
        else:
            units.append(found)
    order = {layer.name: i for i, layer in enumerate(layers)}  # producers before consumers, as in the net
    units.sort(key=lambda u: min(order[m.layer] for m in (u.producers or u.members)))
    return Structure(units, fixed)


def _pruning_groups(trace: _Trace, fixed: dict[str, str]):
    """Each DependencyGraph group rooted at a layer's output channels, as Torch-Pruning's ``get_all_groups``
    yields them, except that a root it cannot map is recorded in ``fixed`` (with why) instead."""
    import torch_pruning as tp

    graph = trace.graph
    roots = (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, nn.Embedding)
    visited: set[nn.Module] = set()
    for root in list(graph.module2node):
        if not isinstance(root, roots) or root in visited:
            continue
        pruner = graph.get_pruner_of_module(root)
        if pruner is None or pruner.get_out_channels(root) is None:
            continue
        try:
            with _tolerant_reshapes():
                group = graph.get_pruning_group(
                    root, pruner.prune_out_channels, list(range(pruner.get_out_channels(root)))
                )
        except (IndexError, ZeroDivisionError, ValueError, KeyError) as e:
            fixed[trace.module_path.get(root, str(root))] = (
                "its channels pass through a reshape of a channels-last tensor (a window partition, say) that "
                "Torch-Pruning takes for a flattening of channels, so it cannot follow them"
                if isinstance(e, _Unfollowable)
                else "its channels pass through a reshape, split or indexing that Torch-Pruning cannot follow "
                f"channel by channel ({type(e).__name__})"
            )
            visited.add(root)
            continue
        visited.update(
            item.dep.target.module
            for item in group.items
            if graph.is_out_channel_pruning_fn(item.dep.handler)
        )
        yield group


def _collect_members(trace: _Trace, group):
    """The memberships of a group's items, gathered per (layer, axis, produces) as (indices, root channels),
    with whether the group preserves zeros, the per-channel modules it passes through and the period of its
    grouped convolutions (0: none); or why the group is fixed."""
    members: dict[tuple[str, int, bool], tuple[list[int], list[int]]] = {}
    zero, passthrough, period = True, [], 0
    for item in group.items:
        found = _item_members(trace, item)
        if found is None:
            continue
        if found == "constant":
            zero = False
            continue
        if isinstance(found, Pass):
            zero &= bool(found.members)  # a deterministic shift: not zero-preserving
            passthrough.append(trace.module_path.get(item.dep.target.module, "?"))
            found = found.members
        if isinstance(found, Grouped):
            period = math.gcd(period, found.size)
            found = found.members
        if isinstance(found, str):
            return found
        for layer, axis, idxs, item_roots, produces in found:
            if layer.name in trace.claimed:
                return f"it reaches {layer.name!r}, whose attention heads are units of their own"
            indices, channel_roots = members.setdefault((layer.name, axis, produces), ([], []))
            indices += list(idxs)
            channel_roots += list(item_roots)
    return members, zero, passthrough, period


def _group_units(name: str, count: int, members: dict, zero: bool, passthrough: list, period: int):
    """The :class:`Units` of a group's gathered memberships (a unit per position of every group where its
    convolutions are grouped), or why the group is fixed."""
    channels = None
    if period:  # grouped convolutions: a unit is a position in every group
        if count % period:
            return f"its {count} channels do not split into the groups of its grouped convolutions"
        channels = torch.arange(count).reshape(count // period, period).T
        members = {key: (i, [r % period for r in roots]) for key, (i, roots) in members.items()}
        count = period
    tensors = []
    for (layer_name, axis, produces), (indices, roots) in members.items():
        per_unit = _per_unit(indices, roots, count)
        if per_unit is None:
            return f"its channels map to unequal numbers of entries of {layer_name!r}"
        tensors.append(Member(layer_name, axis, per_unit, produces))
    if not any(not m.produces for m in tensors):
        return "its channels reach no random layer (only the output, or an operation)"
    return Units(name, count, tuple(tensors), zero, None, tuple(passthrough), channels)


def find_units(
    net: nn.Module, layers: list[Layer] | None = None, example=None, output_key=None
) -> list[Units]:
    """Every group of units of ``net`` that can be removed (see the module docstring), traced on ``example``."""
    layers = find_layers(net) if layers is None else layers
    if example is None:
        from pyrozoo.models.bayesian import _guess_example

        example = _guess_example(net)
    return find_structure(net, layers, example, output_key).units


_STRUCTURES: "weakref.WeakKeyDictionary[nn.Module, Structure]" = weakref.WeakKeyDictionary()


def structure(model) -> Structure:
    """The groups of a Bayesian model's net, traced once per model and remembered. A net that cannot be traced
    (or has no example batch) has no removable groups; ``fixed[""]`` says why."""
    found = _STRUCTURES.get(model)
    if found is None:
        try:
            found = find_structure(model.net, model.layers, model.example_input(), model.output_key)
        except PyrozooError as e:  # a net the tracer cannot follow still trains and prunes weight by weight
            found = Structure([], {"": str(e)})
            warnings.warn(
                f"{e}: no unit of it can be removed, only single weights (give BayesianModel(..., "
                "example_input=x) a batch of its real inputs if the example batch was the problem)",
                stacklevel=2,
            )
        _STRUCTURES[model] = found
    return found


def model_units(model) -> list[Units]:
    """The removable groups of a Bayesian model (:func:`structure`)."""
    return structure(model).units


def effective_masks(model) -> dict[str, torch.Tensor]:
    """Boolean keep-masks with every entry of a dead or unused unit marked pruned too, until nothing changes
    (removing a unit can leave another without inputs or outputs)."""
    masks = {layer.name: model.mask(layer.name).bool().clone() for layer in model.layers}
    return remove_gone_units(model_units(model), masks)


def remove_gone_units(groups: list[Units], masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mark, in place, every entry of each dead or unused unit of ``groups`` pruned in boolean ``masks``, until
    nothing changes; :func:`effective_masks` on masks that need not be the model's."""
    changed = True
    while changed:
        changed = False
        for units in groups:
            gone = units.gone(masks)
            if not bool(gone.any()):
                continue
            before = sum(int(masks[name].sum()) for name in units.layers)
            units.remove(masks, gone)
            changed |= sum(int(masks[name].sum()) for name in units.layers) != before
    return masks


def original_entries(model, layers) -> int:
    """The entries of ``layers``' latents in the original net (a compacted model's full shapes)."""
    full = getattr(model, "full_shapes", {})
    return sum(full.get(layer.name, layer.shape).numel() for layer in layers)


def pruned_fraction(model) -> float:
    """Pruned entries over prunable entries (docs/method.md#pruned-fraction), counting every entry of dead and
    unused units."""
    masks = effective_masks(model)
    prunable = [layer for layer in model.layers if layer.prunable]
    kept = sum(int(masks[layer.name].sum()) for layer in prunable)
    return 1.0 - kept / original_entries(model, prunable)


# --- cutting units out of a plain net ------------------------------------------------------------------------


def _replace(net: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, module)


def _sliced_linear(module: nn.Linear, rows=None, inputs=None) -> nn.Linear:
    weight = module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    if rows is not None:
        rows = rows.to(weight.device)
        weight, bias = weight[rows], None if bias is None else bias[rows]
    if inputs is not None:
        weight = weight[:, inputs.to(weight.device)]
    new = copy.copy(module)  # the same class and attributes, new parameters
    new._parameters = dict(module._parameters)
    new.weight = nn.Parameter(weight.clone())
    new.bias = None if bias is None else nn.Parameter(bias.clone())
    new.out_features, new.in_features = weight.shape
    return new


def _cut_heads(net: nn.Module, units: Units, keep: torch.Tensor) -> None:
    """Cut the heads not in ``keep`` out of each of the group's layers (rows or columns, by membership) and
    set the attention module's head count to what is left."""
    kept: dict[tuple[str, int], list[torch.Tensor]] = {}
    for member in units.members:
        kept.setdefault((member.layer, member.axis), []).append(member.index[keep].flatten())
    for (name, axis), indices in kept.items():
        index = torch.cat(indices).sort().values
        linear = net.get_submodule(name)
        _replace(net, name, _sliced_linear(linear, **({"rows": index} if axis == 0 else {"inputs": index})))
    fix_head_count(net.get_submodule(units.heads_of))


def _outputs(net: nn.Module, example, output_key) -> torch.Tensor:
    args, kwargs = call_arguments(example)
    with torch.no_grad():
        return select_output(net(*args, **kwargs), output_key).detach()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(scale, 1.0)))


@torch.no_grad()
def remove_dead_units(net: nn.Module, model, masks: dict[str, torch.Tensor] | None = None) -> int:
    """Cut the units that can go out of ``net``, a plain copy of ``model.net`` with its weights set, in place;
    returns how many went. Units that can go are those dead or unused under ``masks`` (by default the model's
    effective masks), and the silent ones (every producing weight pruned) whose constant output folds exactly
    into their consumers (:mod:`pyrozoo.bmr.fold`). Why silent units stay is in ``structure(model).stayed``.

    Each group is cut by Torch-Pruning (BatchNorm channels and every coupled layer with it, the module classes
    kept), or, for attention heads, by slicing ``qkv`` and ``proj``. A group keeps at least one unit so that its
    layers stay valid modules. The net's outputs on the example batch are then compared with the unpruned
    net's; if they differ, the groups are cut again one by one, each checked, and a group whose cut changes the
    outputs keeps its units.
    """
    net.eval()
    masks = effective_masks(model) if masks is None else masks
    found = structure(model)
    found.stayed.clear()
    candidates = []
    for units in found.units:
        gone = units.gone(masks).cpu()
        silent = units.silent(masks).cpu() & ~gone  # dead but for a constant: cut where it folds
        if bool((gone | silent).any()):
            candidates.append((units, gone, silent))
    if not candidates:
        return 0
    example = _example_on(model.example_input(), next(net.parameters()).device)
    reference = _outputs(net, example, model.output_key)
    before = copy.deepcopy(net)
    cuts, shifts = _plan(net, example, model.output_key, candidates, found.stayed)
    apply_folds(net, example, model.output_key, shifts)
    _cut(net, cuts, example, model.output_key)
    if _same(_outputs(net, example, model.output_key), reference):
        return sum(int(gone.sum()) for _, gone in cuts)
    _restore(net, before)
    removed = 0
    # a path the graph did not show (a constant reaching the output): find the culprit
    for candidate in candidates:
        before = copy.deepcopy(net)
        cuts, shifts = _plan(net, example, model.output_key, [candidate], {})
        apply_folds(net, example, model.output_key, shifts)
        _cut(net, cuts, example, model.output_key)
        if _same(_outputs(net, example, model.output_key), reference):
            removed += sum(int(gone.sum()) for _, gone in cuts)
        else:
            _restore(net, before)
            units = candidate[0]
            found.stayed[units.name] = (
                f"{int(sum(int(g.sum()) for _, g in cuts))} of its {units.count} units can go by their weights, "
                "but cutting them changed the outputs on the example batch"
            )
    return removed


def _plan(net, example, output_key, candidates, stayed: dict[str, str]):
    """The cuts ``[(units, gone)]`` of ``candidates`` (``(units, gone, silent)``) and the shifts of their
    consumers' outputs that keep the function (silent units whose constant folds); why others stay goes into
    ``stayed``."""
    folding = [(units, silent) for units, _, silent in candidates if bool(silent.any())]
    plans = plan_folds(net, example, output_key, folding) if folding else {}
    cuts, shifts = [], {}
    for units, gone, silent in candidates:
        fold = plans.get(units.name)
        foldable = fold.foldable.cpu() if fold is not None else torch.zeros_like(silent)
        cut = gone | foldable
        if bool(cut.all()):
            cut[0] = False  # a group keeps one unit, so that its layers stay valid modules
        if fold is not None and bool((silent & ~foldable).any()):
            stayed[units.name] = (
                f"{int((silent & ~foldable).sum())} of its {units.count} units have every weight pruned but "
                f"stay: {fold.why}"
            )
        if fold is not None:
            for path, contribution in fold.contributions.items():
                shift = contribution[(cut & silent).to(contribution.device)].sum(0)
                shifts[path] = shifts.get(path, 0) + shift
        if bool(cut.any()):
            cuts.append((units, cut))
    return cuts, shifts


def _cut(net: nn.Module, cuts: list[tuple[Units, torch.Tensor]], example, output_key) -> None:
    graph = None
    try:
        for units, gone in cuts:
            if units.heads_of is not None:
                _cut_heads(net, units, ~gone)
                if graph is not None:  # modules were replaced: trace afresh for the next group
                    release(graph)
                    graph = None
                continue
            if graph is None:
                graph = dependency_graph(net, example, output_key)
            root = net.get_submodule(units.name)
            pruner = graph.get_pruner_of_module(root)
            channels = gone.nonzero().flatten() if units.channels is None else units.channels[gone].flatten()
            with _tolerant_reshapes():
                group = graph.get_pruning_group(root, pruner.prune_out_channels, channels.sort().values.tolist())
            group.prune()
    finally:
        if graph is not None:
            release(graph)


def _restore(net: nn.Module, before: nn.Module) -> None:
    """Make ``net`` (modified in place) again what ``before`` (a deep copy) was."""
    net.__dict__.update(before.__dict__)
