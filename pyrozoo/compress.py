"""A trained network in, a smaller and faster one out: whole units removed in the order the evidence gives.

:func:`compress` takes any trained classifier (an ``nn.Module``) and its data, and

1. fits a Laplace posterior around the trained weights (:func:`pyrozoo.posteriors.laplace.laplace`; its
   prior scale per layer chosen by the evidence): Kronecker-factored by default (``curvature="kfac"``), or
   diagonal;
2. scores every removable unit (a neuron, a channel with what couples to it, an attention head:
   :mod:`pyrozoo.bmr.units`) by the change in evidence ``dF`` of switching the whole unit off, its producing
   rows and consuming columns together (only the consuming side where a BatchNorm follows the producers,
   which makes them scale-invariant: :func:`unit_gains`). Under a diagonal posterior the reduced model of a
   group factorises, so the group's ``dF`` is exactly the sum of its entries'; under KFAC a unit's columns in
   a layer are reduced jointly, their correlations with the rest of the layer included (docs/method.md). For
   a target, units are ranked by default (``score="obd"``) by ``dF`` less its Occam term (diagonal:
   ``-½ Σ (h + δ) w²`` over the unit): the reduced and full models compared at their best weights rather
   than by their evidence. The Occam term ``½ ln(1 + h/δ)`` per entry rewards removing well-determined
   (high-curvature) entries, and on issue 28's BatchNorm CNN, on a validation split, ranking with it lost
   about a point of accuracy after fine-tuning (experiments/RESULTS.md);
3. removes units, most favoured first, until the rebuilt net meets the target (``params=0.25``,
   ``flops=0.3``, ``latency=0.5``: a fraction of the dense net's cost, measured on the rebuilt net), or, with
   ``evidence``, every unit whose removal raises the evidence. ``allocation="uniform"`` takes the same fraction
   of every group's units, the evidence choosing which; ``"global"`` orders all units by ``dF`` per unit of
   cost (parameters, FLOPs, or for latency :func:`latency_model`'s share of a profile of the dense net), each
   group keeping at least ``min_width`` of its units. The default, ``"auto"``, is global for a latency target
   and uniform otherwise: at half the latency, the latency-aware order kept more of the net than a uniform cut
   and ended ahead of Torch-Pruning after fine-tuning on issue 28's BatchNorm CNN, where at equal FLOPs no order
   was found to beat it (docs/howto/compress.md); under KFAC it shares the units out by a diagonal fit. Each
   group keeps at least one unit, so no layer is emptied;
4. rebuilds a plain net of the same classes with the units cut out (:func:`pyrozoo.bmr.rebuild.rebuild`;
   under KFAC its remaining columns at the posterior mean given the removed ones, which compensates for them),
   fine-tunes it, and evaluates it against the dense net and the baselines of :mod:`pyrozoo.pruners`, each
   brought to the same cost (:data:`MATCHED_BY`) and given the same fine-tune.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn
from tqdm.auto import tqdm

from pyrozoo import costs, pruners
from pyrozoo.baselines import LR_SCHEDULE_WORDS, LR_SCHEDULES, finetune
from pyrozoo.bmr.rebuild import rebuild
from pyrozoo.bmr.scores import delta_f
from pyrozoo.bmr.units import Units, model_units, structure
from pyrozoo.calibration import fit_temperature, fold_temperature
from pyrozoo.distributed import World, check_device, current
from pyrozoo.errors import PyrozooError, TargetNotReached, reason
from pyrozoo.metrics import evaluate_net

TARGET_KINDS = (*costs.KINDS, "evidence")


@dataclass(frozen=True)
class Target:
    """What to compress to: a cost ``kind`` and the fraction of the dense net's to keep; ``evidence``: no
    fraction, every unit whose removal raises the evidence goes."""

    kind: str
    value: float | None = None

    def __post_init__(self):
        if self.kind not in TARGET_KINDS:
            raise PyrozooError(f"unknown target {self.kind!r}; known targets: {', '.join(TARGET_KINDS)}")
        if self.kind == "evidence":
            if self.value is not None:
                raise PyrozooError("the evidence target takes no value: --target evidence")
        elif self.value is None or not (0 < self.value < 1):
            raise PyrozooError(
                f"--target {self.kind}=FRACTION keeps that fraction of the dense net's {self.kind}: a number "
                f"between 0 and 1 (e.g. {self.kind}=0.5), got {self.value}"
            )

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}={self.value:g}"

    @classmethod
    def parse(cls, text: str) -> list["Target"]:
        """``"latency=0.5"``, ``"params=0.7,0.5"`` (several fractions of one kind) or ``"evidence"``."""
        kind, sep, values = text.partition("=")
        kind = kind.strip()
        if not sep:
            return [cls(kind)]
        out = []
        for value in values.split(","):
            try:
                number = float(value)
            except ValueError:
                hint = ""
                if "=" in value:
                    hint = "; give each kind its own --target, e.g. --target latency=0.5 --target params=0.3"
                elif value.strip().endswith("%"):
                    hint = f"; a fraction of the dense net's, e.g. {kind}=0.5 for half"
                raise PyrozooError(f"--target {text}: {value!r} is not a number{hint}") from None
            if not math.isfinite(number):
                raise PyrozooError(f"--target {text}: the fraction must be finite, got {value}")
            out.append(cls(kind, number))
        return out


@dataclass
class Ranking:
    """Every removable unit of a Bayesian model, in the order compression removes them."""

    groups: list[Units]
    order: list[tuple[int, int]]  # (group index, unit index), most favoured removal first
    gain: list[float]  # dF of removing each unit in ``order`` (positive: the evidence rises)
    masks: dict[str, torch.Tensor]  # the model's masks before any removal
    # the cost of each unit in ``order`` the ranking divided by, and whether it is a given model's
    # (``unit_cost``: the latency model's fraction of the dense net's time, which guides :func:`reduce_to`)
    cost: list[float] = field(default_factory=list)
    modelled: bool = False


def _masks(model) -> dict[str, torch.Tensor]:
    """The model's keep-masks as booleans, copied."""
    return {layer.name: model.mask(layer.name).bool().clone() for layer in model.layers}


def _positions(model, example: torch.Tensor) -> dict[str, int]:
    """Per layer, how many positions its weights are applied at in one forward pass of one input (a
    convolution's output pixels; 1 for a Linear layer)."""
    found, hooks = {}, []
    for layer in model.layers:
        try:
            module = model.net.get_submodule(layer.name)
        except AttributeError:
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            hooks.append(
                module.register_forward_hook(
                    lambda m, i, out, name=layer.name: found.__setitem__(name, int(out.shape[2:].numel()))
                )
            )
    try:
        with torch.no_grad():
            model.net.eval()(example[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return found


ALLOCATIONS = ("uniform", "global")
# what compress takes: "auto" is global for a latency target (the latency model knows which units hold the
# time: on issue 28's BatchNorm CNN it kept 0.43 of the dense FLOPs at half the latency, where a uniform cut
# keeps 0.26) and uniform for the others, where no global order was found to win
ALLOCATION_CHOICES = ("auto", *ALLOCATIONS)
# with a global allocation, the fraction of each group's units that stays: unbounded, resnet20's global order
# cut the inner convolution of every block to one channel and lost 4 points after fine-tuning
MIN_WIDTH = 0.25
# what ranks the units for a target: the evidence's fit term only (Occam term dropped), or the whole dF
SCORES = ("obd", "evidence")
# the Laplace posterior compress fits (its name for laplace()'s structure): Kronecker-factored, whose correlations
# score a unit's columns jointly and let the survivors compensate in the rebuilt net, or diagonal
CURVATURES = {"kfac": "kron", "diag": "diag"}
# the widest Kronecker factor (rows or columns of a layer's matrix) a KFAC fit may hold: 8,192 (0.5 GB in
# float64, and its eigendecomposition's copies); a wider one (vgg11_bn's 25,089-column classifier) falls back to
# the diagonal posterior, whose memory grows with the layer, not its square
KFAC_WIDEST = 8192


def _too_wide_for_kfac(net: nn.Module) -> tuple[str, int] | None:
    """The first linear or convolution layer of ``net`` whose Kronecker factor would be wider than
    :data:`KFAC_WIDEST`, with that width; None where every one fits."""
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            width = max(m.out_features, m.in_features + 1)
        elif isinstance(m, nn.modules.conv._ConvNd):
            width = max(m.out_channels, m.in_channels // m.groups * math.prod(m.kernel_size) + 1)
        else:
            continue
        if width > KFAC_WIDEST:
            return name, width
    return None


def _check_ranking(allocation: str, score: str, allocations=ALLOCATIONS) -> None:
    """Refuse an ``allocation`` (one of ``allocations``) or ``score`` that :func:`rank_units` does not have, in
    one line."""
    if allocation not in allocations:
        raise PyrozooError(f"unknown allocation {allocation!r}; known: {', '.join(allocations)}")
    if score not in SCORES:
        raise PyrozooError(f"unknown score {score!r}; known: {', '.join(SCORES)}")


def unit_gains(
    units: Units, gains: dict[str, torch.Tensor], kron: dict | None = None, occam: bool = True
) -> torch.Tensor:
    """Per unit, the dF of switching it off: the sum of ``gains`` over its entries; where a normalisation
    follows its producing layers (a BatchNorm), over the normalisation's own entries and the consumers' only.
    The producing rows before a normalisation are scale-invariant in training (it divides out their scale), so
    their dF says how much prior volume they take, not what the unit contributes (docs/howto/compress.md).
    In a layer with a KFAC posterior (``kron``: ``{layer: KroneckerGaussian}``) a unit's whole columns (or rows)
    count jointly (:meth:`~pyrozoo.bmr.kfac.KroneckerGaussian.unit_sets`, the whole dF or with ``occam=False``
    its fit term): the correlations say how far the other columns can stand in for them, which the entries'
    marginal dFs cannot."""
    members = units.members
    if units.passthrough:
        members = [m for m in members if not m.produces or m.layer in units.passthrough] or members
    by_layer: dict[str, list] = {}
    for m in members:
        by_layer.setdefault(m.layer, []).append(m)
    total = 0
    for layer, found in by_layer.items():
        k = (kron or {}).get(layer)
        if k is not None and len({m.axis for m in found}) == 1:
            index = torch.cat([m.index for m in found], dim=1)
            total = total + k.unit_sets(index, found[0].axis, occam).to(gains[layer].dtype)
        else:  # entry by entry (a layer whose unit holds both rows and columns, as a depthwise one's does)
            total = total + sum(m.take(gains[layer]).sum(dim=1) for m in found)
    return total


def rank_units(
    model,
    posterior,
    example: torch.Tensor,
    by: str = "params",
    unit_cost=None,
    allocation: str = "global",
    score: str = "evidence",
    min_width: float = 0.0,
    shares=None,
) -> Ranking:
    """The removable units of ``model`` ranked for removal, most favoured first; the last live unit of each
    group is left out, and with ``allocation="global"`` the last ``min_width`` of its units (rounded up).
    Within a group units go in order of :func:`unit_gains` per unit of cost. Across groups,
    ``allocation="global"`` orders every unit by ``dF`` per cost; ``"uniform"`` interleaves the groups so that
    any prefix takes about the same fraction of each group's units (Torch-Pruning's one ratio per layer, the
    evidence choosing which units). The cost of a unit is its parameters (``by="params"``), its FLOPs
    (``"flops"``), or, given ``unit_cost`` (``{group index: cost of one of its units}``, e.g. from
    :func:`latency_model`), that. ``score="obd"`` ranks by dF without its Occam term
    (:func:`pyrozoo.bmr.scores.delta_f` with ``occam=False``: the reduced and full models compared at their best
    weights, not by their evidence); ``Ranking.gain`` is then that score, never positive. Under a KFAC
    posterior both are read per unit jointly where its entries are whole columns or rows of a layer
    (:func:`unit_gains`). Given ``shares`` (``(model, posterior)`` of a diagonal Laplace fit of the same net), a
    global order takes each group's share from that posterior's dFs and only the choice within each group from
    ``posterior``'s."""
    _check_ranking(allocation, score)
    groups = model_units(model)
    if not groups:
        fixed = "; ".join(f"{k or 'the net'}: {v}" for k, v in structure(model).fixed.items())
        raise PyrozooError(f"this net has no unit that can be removed ({fixed or 'no coupled groups found'})")
    names = {name for units in groups for name in units.layers}
    gains = delta_f(model, posterior, names, occam=score == "evidence")
    masks = _masks(model)
    positions = _positions(model, example) if by == "flops" and unit_cost is None else {}
    candidates = []
    kron = getattr(posterior, "kron", {})
    kron = {layer.name: kron[layer.site] for layer in model.layers if layer.site in kron}
    # a global order under KFAC takes the groups' shares from a diagonal posterior, which units of a group go
    # from the joint scores: each joint score counts on the rest of its layer standing in for the unit, and
    # KFAC's marginals are wider than the exact diagonal's, so across layers both make many removals from a wide
    # layer look cheap (resnet20's first and last stages went to their floors: 0.8841 and 0.8953, session 13)
    if shares is not None and allocation == "global":
        shared = delta_f(shares[0], shares[1], names, occam=score == "evidence")
    else:
        shared = None
    for g, units in enumerate(groups):
        live = {name: masks[name] for name in units.layers}
        masked = {name: torch.where(live[name], gains[name], 0.0) for name in live}
        gain = unit_gains(units, masked, kron, occam=score == "evidence")
        if unit_cost is not None:
            size = torch.full_like(gain, unit_cost.get(g, math.inf))
        else:
            size = units.total({name: live[name].to(gain.dtype) * positions.get(name, 1) for name in live})
        alive = (~units.gone(live)).nonzero().flatten().tolist()
        if len(alive) < 2:
            continue
        per_cost = (gain / size.clamp(min=1e-12)).tolist()
        alive.sort(key=lambda u: per_cost[u], reverse=True)
        share = per_cost
        if shared is not None:
            diagonal = unit_gains(units, {name: torch.where(live[name], shared[name], 0.0) for name in live})
            share = (diagonal / size.clamp(min=1e-12)).tolist()
        # the place in the order of the group's i-th removal
        slots = sorted((share[u] for u in alive), reverse=True)
        stay = max(1, math.ceil(min_width * units.count)) if allocation == "global" else 1
        for i, u in enumerate(alive[: max(0, len(alive) - stay)]):  # the group's last units stay
            key = (-(i + 1) / len(alive), per_cost[u]) if allocation == "uniform" else (slots[i],)
            candidates.append((key, float(gain[u]), g, u, float(size[u])))
    candidates.sort(key=lambda c: c[0], reverse=True)
    order, gain_of, cost_of = (
        [c[2:4] for c in candidates],
        [c[1] for c in candidates],
        [c[4] for c in candidates],
    )
    return Ranking(groups, order, gain_of, masks, cost_of, unit_cost is not None)


def rank_for(
    model,
    posterior,
    target: Target,
    dense: nn.Module,
    example,
    trace_example,
    allocation: str,
    repeats: int = 7,
    score: str = "evidence",
    world: World | None = None,
    min_width: float = MIN_WIDTH,
    shares=None,
) -> Ranking:
    """The ranking :func:`compress` reduces ``model`` along for ``target``: by evidence per parameter for
    ``evidence`` (always global and the whole dF: the units whose removal raises the evidence); otherwise by
    ``score`` per unit of the target's cost (the :func:`latency_model` for a latency target), with
    ``allocation`` across groups (``"auto"``: :data:`ALLOCATION_CHOICES`) and, where global, ``min_width`` of
    every group left, the groups' shares from ``shares`` where given (:func:`rank_units`). In a run of several
    processes (``world``) the latency model is timed by the first and given to all, so that every process ranks
    alike."""
    if target.kind == "evidence":
        return rank_units(model, posterior, trace_example)
    allocation = resolved_allocation(allocation, target)
    world = World() if world is None else world
    latency = target.kind == "latency" and allocation == "global"
    modelled = world.agree(lambda: latency_model(model, dense, example, repeats)) if latency else None
    by = "params" if target.kind == "params" else "flops"
    return rank_units(model, posterior, trace_example, by, modelled, allocation, score, min_width, shares)


def resolved_allocation(allocation: str, target: Target) -> str:
    """``allocation`` as :func:`rank_for` applies it to ``target``: ``"auto"`` is global for latency and uniform
    otherwise; the evidence target is always ranked globally."""
    if target.kind == "evidence":
        return "global"
    if allocation != "auto":
        return allocation
    return "global" if target.kind == "latency" else "uniform"


def floored(allocation: str, target: Target) -> bool:
    """Whether ``min_width`` holds for ``target`` under ``allocation``: a global order for a cost target (the
    evidence target's global order stops where dF does, with no floor)."""
    return target.kind != "evidence" and resolved_allocation(allocation, target) == "global"


def latency_model(model, dense: nn.Module, example: torch.Tensor, repeats: int = 7) -> dict[int, float]:
    """``{group index: the fraction of the dense net's time one of its units costs}``, from the dense net's
    modules timed once (:func:`pyrozoo.costs.module_times`): a unit's share of each layer it has entries in (its
    rows or columns over the layer's), and a 1/count share of the modules that run on the group's channels
    between its producing layers and its consumers (BatchNorm, activation, pooling), over the time of every
    module. Unlike timing a rebuilt net per group, whose drop in latency is a difference of two noisy timings,
    the shares come from one profile, so the ranking does not move with the load on the machine. The model is
    linear: a layer losing a fraction of its inputs and of its outputs is charged both, where its time falls
    by their product, which is why :func:`reduce_to` measures what it guesses from it."""
    times = costs.module_times(dense, example, repeats)
    total = sum(t for _, t, _ in times) or 1.0
    position = {name: i for i, (name, _, _) in enumerate(times)}
    seconds = {name: t for name, t, _ in times}
    masks = _masks(model)
    found = {}
    for g, units in enumerate(model_units(model)):
        cost = sum(
            seconds.get(m.layer, 0.0) * m.index.shape[1] / masks[m.layer].shape[m.axis] for m in units.members
        )
        producers = [position[m.layer] for m in units.producers if m.layer in position]
        consumers = {m.layer for m in units.consumers}
        for name, t, width in times[max(producers, default=len(times)) + 1 :]:
            if name in consumers or width != units.count:
                break
            cost += t / units.count
        found[g] = cost / total
    return found


def _set_masks(
    model, masks: dict[str, torch.Tensor], groups: list[Units], removed: dict[int, list[int]]
) -> None:
    """Set ``model``'s masks to ``masks`` (left as they are) less the units ``removed`` (``{group index: unit
    indices}``) of ``groups``."""
    masks = {name: mask.clone() for name, mask in masks.items()}
    for g, units in removed.items():
        remove = torch.zeros(groups[g].count, dtype=torch.bool)
        remove[units] = True
        groups[g].remove(masks, remove)
    for name, mask in masks.items():
        model.set_mask(name, mask)


def remove_first(model, ranking: Ranking, count: int) -> None:
    """Set ``model``'s masks to those before compression less the first ``count`` units of ``ranking``."""
    chosen: dict[int, list[int]] = {}
    for g, u in ranking.order[:count]:
        chosen.setdefault(g, []).append(u)
    _set_masks(model, ranking.masks, ranking.groups, chosen)


# a latency search aims this fraction below the target, so that the net it picks still reads at most the target
# when read again: the reading it stops at is the lowest of a few noisy ones, and the report's round-robin read
# session 12's picks 0.008 higher on average (sd 0.014, 14 searches on three nets at load 1-4)
LATENCY_MARGIN = 0.03
# a latency search guided by the latency model stops at a reading this close below its aim (a fraction of the
# target): about the spread of one net's readings on the thread's clock at load 3 (0.49-0.51, pyrozoo.costs)
LATENCY_SLACK = 0.03
# the latency search's first probes are the model's guesses, corrected by the readings so far; after them it
# steps out beyond its last reading while every reading lies on one side of the aim (:func:`_next_probe`), and
# bisects once the aim is bracketed
MODEL_PROBES = 3


def _modelled_guess(ranking: Ranking, target: float):
    """``guess(readings, lo, hi)``: the count of removals in ``[lo, hi)`` that the latency model, corrected by
    the ``readings`` so far (``{count: measured ratio}``), puts at ``target``. The model predicts ``1 - `` the
    summed shares of the removed units (:func:`latency_model`); one reading scales it, two or more fit the line
    through the two nearest the target (the model's error is mostly a scale and an offset: the time a layer
    keeps whatever its width)."""
    predicted = [1.0]
    for cost in ranking.cost:
        predicted.append(predicted[-1] - cost)

    def count_at(level: float) -> int:  # the fewest removals the model puts at or below ``level``
        return next((c for c, value in enumerate(predicted) if value <= level), len(predicted) - 1)

    def guess(readings: dict[int, float], lo: int, hi: int) -> int:
        level = target
        near = sorted(readings, key=lambda c: abs(readings[c] - target))[:2]
        if near and predicted[near[0]] > 0:
            level = target * predicted[near[0]] / readings[near[0]]
        if len(near) == 2 and predicted[near[0]] != predicted[near[1]]:
            (a, b), (va, vb) = (predicted[c] for c in near), (readings[c] for c in near)
            if (vb - va) / (b - a) > 0:  # a reading's noise can tip the line over: then the scale alone
                level = a + (target - va) * (b - a) / (vb - va)
        return min(max(count_at(level), lo), hi - 1)

    return guess


def _next_probe(readings: dict[int, float], lo: int, hi: int, aim: float, guess) -> int:
    """The count of removals a latency search reads next, in ``[lo, hi)``: the model's ``guess`` for the first
    :data:`MODEL_PROBES` readings (no guess: bisection throughout); then, while every reading (``{count:
    value}``, in the order read) lies on one side of ``aim``, a step beyond the reading nearest the other side,
    the last step's length doubled at each such step (a guess that landed just short had left the other side of
    the aim unread, and bisecting everything beyond it read 8 more candidates on the BatchNorm CNN); once the
    aim is bracketed, the middle of ``[lo, hi)``."""
    if guess is None:
        return (lo + hi) // 2
    if len(readings) < MODEL_PROBES:
        return guess(readings, lo, hi)
    sides = {value <= aim for value in readings.values()}
    if len(sides) == 2:
        return (lo + hi) // 2
    counts = list(readings)
    last = abs(counts[-1] - counts[-2]) if len(counts) > 1 else 1
    step = max(last * (2 if len(counts) > MODEL_PROBES else 1), 1)  # the first step out: the last guess's
    # from the reading nearest the side not read: above the aim, the most removals read (lo - 1); below, the
    # fewest (hi)
    beyond = hi - step if sides == {True} else lo - 1 + step
    return min(max(beyond, lo), hi - 1)


def reduce_to(
    model,
    posterior,
    ranking: Ranking,
    target: Target,
    dense: nn.Module,
    example,
    repeats: int = 7,
    world: World | None = None,
):
    """The rebuilt net with as few units removed as meets ``target``: bisection over the ranking's prefix, each
    candidate rebuilt and measured; returns ``(net, units removed, cost, candidates measured)``. A latency
    target is aimed :data:`LATENCY_MARGIN` below, so that the net meets it when read again. For a latency
    target ranked by the latency model (:func:`rank_for`), the first probes are the model's guesses corrected
    by the readings (:func:`_modelled_guess`), then steps out until the aim is bracketed (:func:`_next_probe`),
    and the search stops at a reading within :data:`LATENCY_SLACK` below the aim: fewer readings than a
    bisection's nine or ten, each a noisy timing of two nets. In a run
    of several processes (``world``) the first measures each candidate for all (a latency differs between
    them), so that every process searches alike."""
    world = World() if world is None else world
    if target.kind == "evidence":
        count = sum(1 for gain in ranking.gain if gain > 0)
        remove_first(model, ranking, count)
        net = rebuild(model, posterior)
        return net, count, costs.cost("params", net, dense, example), 0

    def measured(count: int) -> tuple[nn.Module, float]:
        remove_first(model, ranking, count)
        net = rebuild(model, posterior)
        return net, world.agree(lambda: costs.cost(target.kind, net, dense, example, repeats))

    aim = target.value * (1 - LATENCY_MARGIN) if target.kind == "latency" else target.value
    guided = target.kind == "latency" and ranking.modelled
    guess = _modelled_guess(ranking, aim) if guided else None
    readings: dict[int, float] = {}
    lo, hi = 0, len(ranking.order)
    best = None
    while lo < hi:  # the fewest removals whose cost is at most the aim
        mid = _next_probe(readings, lo, hi, aim, guess)
        net, value = measured(mid)
        readings[mid] = value
        if value <= aim:
            hi, best = mid, (net, mid, value)
            if guided and value >= aim - target.value * LATENCY_SLACK:
                return (*best, len(readings))
        else:
            lo = mid + 1
        del net  # a candidate that is not the best goes before the next is built
    if best is None or best[1] != lo:
        net, value = measured(lo)
        best, readings[lo] = (net, lo, value), value
    return (*best, len(readings))


def build_net(spec: str, data, net_options: dict | None = None) -> nn.Module:
    """The untrained net ``spec`` (a pyrozoo net, ``tv:NAME``, ``timm:NAME`` or ``package.module:factory``)
    built for ``data``'s images and classes with ``net_options`` (its sizes)."""
    import importlib
    import inspect

    from pyrozoo.nets import NETS, PREFIXES, create_net

    net_options = net_options or {}
    shape = {"in_channels": data.x_train.shape[1], "num_classes": data.num_classes}
    shape["image_size"] = data.x_train.shape[-1]
    if spec in NETS or spec.partition(":")[0] in PREFIXES:
        return create_net(spec, **shape, **net_options)
    if ":" not in spec:
        raise PyrozooError(
            f"unknown net {spec!r}: give a pyrozoo net ({', '.join(NETS)}), tv:NAME, timm:NAME or "
            "package.module:factory"
        )
    module_name, _, factory_name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as e:
        raise PyrozooError(f"cannot find the net factory {spec} ({e})") from None
    try:
        takes = inspect.signature(factory).parameters
        net = factory(**{k: v for k, v in shape.items() if k in takes}, **net_options)
    except Exception as e:  # the user's code: whatever it raises is theirs to fix, not a pyrozoo bug
        raise PyrozooError(f"the net factory {spec} failed ({reason(e)})") from None
    if not isinstance(net, nn.Module):
        raise PyrozooError(f"{spec} returned a {type(net).__name__}, not an nn.Module")
    return net


def load_trained_net(
    spec: str, weights: str, data, trust_pickle: bool = False, net_options: dict | None = None
) -> nn.Module:
    """The trained net to compress: :func:`build_net` holding the state_dict in ``weights``; or, with
    ``trust_pickle``, the net saved whole in ``weights`` (then ``spec`` only names it)."""
    from pyrozoo.init_from import load_state, trained_net
    from pyrozoo.torchfile import load_tensors

    if trust_pickle:
        whole = load_tensors(weights, trust_pickle=True)
        if isinstance(whole, nn.Module):
            return whole.eval()
    net = build_net(spec, data, net_options)
    return trained_net(
        net, load_state(weights, trust_pickle=trust_pickle, flag="--weights"), what=f"--weights {weights}"
    ).eval()


@dataclass
class Compressed:
    """What :func:`compress` returns: pyrozoo's net for each target, and the table of every method's row."""

    nets: dict[str, nn.Module]  # str(target) -> the compressed, fine-tuned plain net
    table: list[dict]
    dense: dict
    record: dict  # how the table was made: the options (the curvature as fitted), machine and date
    example: torch.Tensor  # test inputs the nets are exported on

    @property
    def net(self) -> nn.Module:
        """The net of the first target."""
        return next(iter(self.nets.values()))

    @property
    def curvature(self) -> str:
        """The Laplace posterior's curvature, as fitted (a net too wide for KFAC gets ``"diag"``)."""
        return self.record["curvature"]

    def save(self, folder, **said) -> None:
        """Write ``folder`` as ``pyrozoo compress --out`` does (:func:`write_report`): the report, the figure
        and every target's net, its record :attr:`record` with ``said`` (what compress cannot know, e.g.
        ``net="my-cnn"``) in front."""
        known = sorted(set(said) & set(self.record))
        if known:
            raise PyrozooError(
                f"save: {', '.join(known)} {'is' if len(known) == 1 else 'are'} recorded by compress itself; pass "
                "only what it cannot know (e.g. net=, weights=)"
            )
        write_report(self, folder, {**said, **self.record}, self.example)


def _data(data):
    """``data`` as an object with x_train, y_train, x_test, y_test, num_classes: a pyrozoo dataset's name, a
    prepared dataset, or a tuple ``(x_train, y_train, x_test, y_test)`` of tensors."""
    from pyrozoo import data as datasets

    if isinstance(data, str):
        prepared = datasets.prepare(datasets.load(data))
        if prepared.task != "classify":
            raise PyrozooError(f"compress takes a classification data set; {data} is a regression one")
        return prepared
    if isinstance(data, tuple):
        if len(data) != 4:
            raise PyrozooError("data as tensors is a tuple (x_train, y_train, x_test, y_test)")
        x_train, y_train, x_test, y_test = data
        classes = int(max(y_train.max(), y_test.max())) + 1
        return SimpleNamespace(
            x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, num_classes=classes
        )
    return data


def _row(method: str, target: Target, net: nn.Module, metrics: dict, example: torch.Tensor, **extra) -> dict:
    """A method's row but its latencies (:func:`_time_rows` reads them for every row at once)."""
    return {
        "method": method,
        "target": str(target),
        **{k: metrics[k] for k in ("accuracy", "nll", "ece")},
        "params": costs.parameters(net),
        "nonzero_params": sum(int((p != 0).sum()) for p in net.parameters()),
        "flops": costs.flops(net, example),
        **extra,
    }


@dataclass
class _Job:
    """What every method of one :func:`compress` call shares: the data, the dense net, the timing examples
    and the fine-tune every pruned net gets. Fine-tuning and the test metrics run on ``device`` (the data moved
    there once); every net stays on the CPU between them, where it is pruned and its costs are measured. In a run
    of several processes (``world``) they share the fine-tune's batches and the test set, and the first measures
    the costs for all."""

    d: object
    dense: nn.Module
    example: dict[int, torch.Tensor]
    repeats: int
    finetune_steps: int
    lr: float
    lr_schedule: str
    batch_size: int
    seed: int
    allocation: str = "auto"
    score: str = "obd"
    min_width: float = MIN_WIDTH
    device: str = "cpu"
    world: World = field(default_factory=World)
    held_out: tuple[torch.Tensor, torch.Tensor] | None = None  # (inputs, labels) each net's temperature is fit on
    compute_threads: int = 0  # torch threads for the fine-tunes and metrics (0: as many as the caller's)
    head: str = ""  # the module the temperature is folded into: the net's output layer
    moved: dict = field(default_factory=dict)
    timed: list = field(default_factory=list)  # (row, net): the rows whose latencies are still to be read

    def data(self, name: str) -> torch.Tensor:
        """The data's tensor ``name`` (``x_train``, ``y_test``, ...) on the job's device."""
        if name not in self.moved:
            self.moved[name] = getattr(self.d, name).to(self.device)
        return self.moved[name]

    def computing(self):
        """The context the job's compute runs in: torch on :attr:`compute_threads` (the timing may use fewer)."""
        return costs.torch_threads(self.compute_threads or torch.get_num_threads())

    def tune(self, net: nn.Module) -> None:
        x, y = self.data("x_train"), self.data("y_train")
        options = dict(world=self.world, schedule=self.lr_schedule)
        with self.computing():
            finetune(
                net.to(self.device), x, y, self.finetune_steps, self.lr, self.batch_size, self.seed, **options
            )
        net.cpu()

    def tune_pruned(self, net: nn.Module) -> tuple[float, float]:
        """Fine-tune the pruned ``net`` (:meth:`tune`), its test accuracy read first, as pruning left it; returns
        that accuracy and the seconds the reading took (left out of its method's time: the fine-tune does not
        need it)."""
        start = time.perf_counter()
        accuracy = self.tested(net)["accuracy"]
        reading = time.perf_counter() - start
        self.tune(net)
        return accuracy, reading

    def tested(self, net: nn.Module) -> dict:
        """``net``'s test metrics (:func:`~pyrozoo.metrics.evaluate_net`), read on the job's device."""
        x, y = self.data("x_test"), self.data("y_test")
        with self.computing():
            metrics = evaluate_net(net.to(self.device), x, y, self.d.num_classes, world=self.world)
        net.cpu()
        return metrics

    def cost(self, kind: str, net: nn.Module, reference: nn.Module) -> float:
        """``net``'s ``kind`` of cost as a fraction of ``reference``'s, measured by the first process for all."""
        return self.world.agree(lambda: costs.cost(kind, net, reference, self.example[256], self.repeats))

    def calibrated(self, net: nn.Module) -> float:
        """Fold into ``net``'s head the temperature fitted on the held-out inputs (its logits read on the job's
        device); returns it."""
        x, y = self.held_out
        with torch.no_grad(), self.computing():
            net.to(self.device).eval()
            logits = torch.cat([net(batch.to(self.device)).cpu() for batch in x.split(1000)])
            net.cpu()
        temperature = fit_temperature(logits, y)
        fold_temperature(net, self.head, temperature, x[:8])
        return temperature

    def row(self, method: str, target: Target, net: nn.Module, **extra) -> dict:
        """``net``'s row, its latencies left to :func:`_time_rows` (the net is held until then); with held-out
        inputs, of ``net`` calibrated (in place; the dense net a copy, since it is the caller's)."""
        timed = net  # a temperature leaves the cost alone: the dense row is timed as the reference itself
        if self.held_out is not None:
            net = copy.deepcopy(net) if net is self.dense else net
            extra["temperature"] = self.calibrated(net)
        metrics = self.tested(net)
        # the first process's row for all: the same in each, its seconds included
        row = self.world.agree(lambda: _row(method, target, net, metrics, self.example[1], **extra))
        self.timed.append((row, timed))
        return row


def _time_rows(job: _Job) -> None:
    """Every row's latency at batch 1 and 256 as a ratio to the dense net's, all the nets timed in turns in one
    round-robin per batch size (so that they compare among themselves), by the first process for all: on the
    CPU, and where there is a GPU on it too (``gpu_latency_b1``, ``gpu_latency_b256``; the job's device where
    that is one). The dense row also gets the dense net's CPU milliseconds per pass (``latency_ms_b1``,
    ``latency_ms_b256``) and the clock they were read on (``latency_clock``)."""
    gpu = job.device if torch.device(job.device).type == "cuda" else None
    if gpu is None and torch.cuda.is_available():
        gpu = "cuda"

    def measured() -> dict[str, list[float]]:
        nets = [net for _, net in job.timed]
        found = {}
        for batch in (1, 256):
            example = job.example[batch]
            ratios, seconds = costs.latency_readings(nets, job.dense, example, job.repeats)
            found[f"latency_b{batch}"] = ratios
            found[f"latency_ms_b{batch}"] = 1000 * seconds
            if gpu is not None:
                ratios = costs.device_latency_ratios(nets, job.dense, example, gpu, job.repeats)
                found[f"gpu_latency_b{batch}"] = ratios
        return found

    found = job.world.agree(measured)
    dense = {column: found.pop(column) for column in ("latency_ms_b1", "latency_ms_b256")}
    for i, (row, _) in enumerate(job.timed):
        row.update({column: ratios[i] for column, ratios in found.items()})
        if row["method"] == "dense":
            clock = "one thread's CPU time" if costs.timing_clock() is time.thread_time else "wall clock"
            row.update(dense, latency_clock=clock)
    job.timed.clear()


def as_targets(target: str | Target | list[str | Target]) -> list[Target]:
    """``target`` as a list of targets: a string as the command line takes it, a :class:`Target`, or a list of
    either."""
    if isinstance(target, (str, Target)):
        target = [target]
    found = []
    for item in target:
        if not isinstance(item, (str, Target)):
            raise PyrozooError(f"a target is a string such as 'latency=0.5' or a Target, not {item!r}")
        found += Target.parse(item) if isinstance(item, str) else [item]
    return found


def _references(job: _Job, log) -> list[dict]:
    """The dense net's row, and the dense net given the same fine-tune (every pruned net gets it, so the front
    is read against this)."""
    with torch.random.fork_rng():
        torch.manual_seed(job.seed)
        dense_row = job.row("dense", Target("evidence"), job.dense)
    dense_row["target"] = "-"
    dense_row["test_inputs"] = len(job.d.y_test)
    log(f"dense: {dense_row['params']:,} parameters, accuracy {dense_row['accuracy']:.4f}")
    if not job.finetune_steps:
        return [dense_row]
    tuned = copy.deepcopy(job.dense)
    job.tune(tuned)
    tuned_row = job.row("dense+finetune", Target("evidence"), tuned, untuned_accuracy=dense_row["accuracy"])
    tuned_row["target"] = "-"
    return [dense_row, tuned_row]


def _pyrozoo(
    job: _Job, model, posterior, t: Target, fitted: float, log, shares=None
) -> tuple[nn.Module, dict]:
    """pyrozoo's net for target ``t``, fine-tuned, and its row; a global order's shares from ``shares`` where
    given (:func:`rank_units`)."""
    start = time.perf_counter()
    trace = job.d.x_train[:2]
    example = job.example[256]
    choice = (job.allocation, job.repeats, job.score, job.world, job.min_width, shares)
    ranking = rank_for(model, posterior, t, job.dense, example, trace, *choice)
    small, removed, value, readings = reduce_to(
        model, posterior, ranking, t, job.dense, example, job.repeats, job.world
    )
    if posterior.structure == "kron":  # the same net, its survivors compensating for the removed inputs
        remove_first(model, ranking, removed)
        with posterior.compensating(model):
            small = rebuild(model, posterior)
    remove_first(model, ranking, 0)  # the model as fitted, for the next target
    untuned, reading = job.tune_pruned(small)
    seconds = fitted + time.perf_counter() - start - reading
    measured = f", {readings} candidates measured" if readings else ""
    has_floor = floored(job.allocation, t)
    # what is removable moves with the target: a global order leaves each group its floor
    floor = f" ({_floor_words(job.min_width)})" if has_floor else ""
    log(
        f"{t}: pyrozoo removed {removed} of {len(ranking.order)} removable units{floor} ({value:.3f} of the "
        f"dense cost{measured}), accuracy {untuned:.4f} before the fine-tune"
    )
    allocation = resolved_allocation(job.allocation, t)
    reached = t.kind == "evidence" or value <= t.value
    if not reached:
        log(
            f"{t}: not reached, {value:.3f} with every removable unit gone{_floor_hint(allocation, job.min_width)}"
        )
    extra = {
        "allocation": allocation,
        "search_cost": value,
        "search_readings": readings,
        "reached": reached,
        "untuned_accuracy": untuned,
    }
    if has_floor:
        extra["min_width"] = job.min_width
    return small, job.row("pyrozoo", t, small, units_removed=removed, seconds=seconds, **extra)


def _floor_words(min_width: float) -> str:
    """The floor of a global allocation, as the log and the report's note say it."""
    return f"each group keeping at least {min_width:.0%}"


def _floor_hint(allocation: str, min_width: float) -> str:
    """What to change where a global allocation's floor left the target out of reach."""
    if allocation != "global" or min_width <= 0:
        return ""
    return f" (each group keeps {min_width:.0%} of its units: a lower --min-width or --allocation uniform may reach it)"


# what a channel baseline is matched to pyrozoo's net by, per target kind: the target's own cost (parameters
# for evidence). Latency too, not FLOPs: a latency-aware allocation reaches a latency with more FLOPs than a
# uniform one (on issue 28's BatchNorm CNN, 0.43 of the dense FLOPs at 0.49 of its latency, against 0.27), so
# a baseline at pyrozoo's FLOPs would run slower than the target
MATCHED_BY = {"evidence": "params", "params": "params", "flops": "flops", "latency": "latency"}


def _baseline(job: _Job, name: str, t: Target, small: nn.Module, keep: list[nn.Module]) -> dict:
    """The row of baseline ``name`` brought to the cost of pyrozoo's net ``small`` for ``t``, in the kind of
    :data:`MATCHED_BY`, and given the same fine-tune. The cost reached, not the target: where pyrozoo's net
    lands below the target, a baseline brought to the target would be compared at a larger size. Each candidate
    is measured against ``small`` itself: for latency, the two timed in turns, nets of about the same speed on
    which a loaded machine's slowdown falls alike (against the dense net, a small net's ratio drifts with the
    load: 0.37 at load 2 and 0.32 at load 4 on the BatchNorm CNN)."""
    start = time.perf_counter()
    dense = job.dense
    if name == "global-magnitude":  # as many weights zeroed as pyrozoo's net has fewer
        fraction = 1 - costs.parameters(small) / costs.parameters(dense)
        pruned = pruners.global_magnitude(dense, keep, fraction)
        untuned, reading = job.tune_pruned(pruned)
        pruners.make_permanent(pruned)
        matched = {"matched_by": "nonzero params"}
    else:
        kind = MATCHED_BY[t.kind]
        batch = (job.d.x_train[: job.batch_size], job.d.y_train[: job.batch_size])
        measure = lambda candidate: job.cost(kind, candidate, small)  # noqa: E731
        pruned, ratio = pruners.channel_prune_to(dense, job.example[1], name, keep, measure, 1.0, batch)
        untuned, reading = job.tune_pruned(pruned)
        matched = {"matched_by": kind, "matched": ratio}
    seconds = time.perf_counter() - start - reading
    return job.row(name, t, pruned, seconds=seconds, untuned_accuracy=untuned, **matched)


def _fitted(dense: nn.Module, x: torch.Tensor, curvature: str, global_order: bool, fit: dict, log):
    """``(curvature as fitted, model, posterior, shares)``: the Laplace fit of ``curvature`` around ``dense``
    (KFAC falls back to the diagonal for a net with a factor wider than :data:`KFAC_WIDEST`), and under KFAC
    with a ``global_order`` the diagonal fit that shares the units out (:func:`rank_units`), else None."""
    from pyrozoo.posteriors.laplace import laplace

    wide = _too_wide_for_kfac(dense) if curvature == "kfac" else None
    if wide:
        log(
            f"{wide[0]}'s Kronecker factor would be {wide[1]:,} wide (more than {KFAC_WIDEST:,}): fitting the "
            "diagonal posterior instead (--curvature diag)"
        )
        curvature = "diag"
    size = fit["fit_size"]
    inputs = f"{min(size, len(x)):,}" if size else f"all {len(x):,}"
    log(f"fitting a {curvature} Laplace posterior around the trained weights on {inputs} training inputs")
    model, posterior = laplace(dense, x, CURVATURES[curvature], **fit)
    shares = laplace(dense, x, "diag", **fit) if curvature == "kfac" and global_order else None
    return curvature, model, posterior, shares


CALIBRATION_FEWEST = 100  # held-out inputs a temperature is fitted on, and test inputs left for the metrics


def _held_out(d, count: int, seed: int):
    """``(d with its test set less count inputs, (those inputs, their labels))``, the held-out inputs drawn by
    ``seed``; ``(d, None)`` for a count of 0."""
    tests = len(d.y_test)
    fewest = CALIBRATION_FEWEST
    if isinstance(count, bool) or not isinstance(count, int) or not (count == 0 or fewest <= count <= tests - fewest):
        most = f"{tests - fewest:,}" if tests >= 2 * fewest else f"none here: {tests:,} test inputs"
        raise PyrozooError(
            f"calibrate (--calibrate) is how many of the {tests:,} test inputs to hold out for the temperatures: 0 "
            f"(none, the default) or from {fewest} to {most} (at least {fewest} held out and {fewest} left for "
            f"the metrics; a few thousand fit a temperature well); got {count!r}"
        )
    if count == 0:
        return d, None
    order = torch.randperm(tests, generator=torch.Generator().manual_seed(seed))
    held, rest = order[:count], order[count:].sort().values
    kept = copy.copy(d)
    kept.x_test, kept.y_test = d.x_test[rest], d.y_test[rest]
    return kept, (d.x_test[held], d.y_test[held])


def _check_options(
    baselines,
    allocation: str,
    score: str,
    finetune_steps: int,
    batch_size: int,
    schedule: str,
    min_width: float,
    repeats: int,
    threads: int | None = None,
):
    """Refuse, in one line each, the options of :func:`compress` that name nothing it has or count wrong."""
    unknown = set(baselines) - set(pruners.PRUNERS)
    if unknown:
        raise PyrozooError(f"unknown baselines {sorted(unknown)}; known: {', '.join(pruners.PRUNERS)}")
    _check_ranking(allocation, score, ALLOCATION_CHOICES)
    if isinstance(min_width, bool) or not isinstance(min_width, (int, float)) or not 0 <= min_width < 1:
        raise PyrozooError(
            f"min_width (--min-width) is the least fraction of each layer group a global allocation keeps, a "
            f"number in [0, 1) such as 0.25; got {min_width!r}"
        )
    if finetune_steps < 0 or batch_size < 1:
        raise PyrozooError("finetune_steps must not be negative, and batch_size must be at least 1")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise PyrozooError(
            f"repeats (--repeats) is how many rounds each latency is read over, a whole number at least 1; got "
            f"{repeats!r}"
        )
    if schedule not in LR_SCHEDULES:
        raise PyrozooError(f"unknown lr_schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise PyrozooError(
            f"threads (--threads) is how many torch threads latency is timed on, a whole number at least 1 (or "
            f"None: torch's own count); got {threads!r}"
        )


def compress(
    net: nn.Module,
    data,
    target: str | Target | list[str | Target] = "evidence",
    *,
    finetune_steps: int = 300,
    lr: float = 1e-3,
    lr_schedule: str = "cosine",
    batch_size: int = 128,
    fit_size: int | None = 2000,
    baselines: tuple[str, ...] = pruners.PRUNERS,
    repeats: int = 7,
    seed: int = 0,
    allocation: str = "auto",
    score: str = "obd",
    min_width: float = MIN_WIDTH,
    curvature: str = "kfac",
    device: str = "cpu",
    calibrate: int = 0,
    threads: int | None = 1,
    progress: bool = True,
    log=print,
) -> Compressed:
    """Compress the trained classifier ``net`` on ``data`` (see the module docstring) to each target, the units
    shared out across groups by ``allocation`` (at least ``min_width`` of each group left where global) and
    ranked by ``score`` (:func:`rank_units`) under a Laplace posterior of ``curvature`` (:data:`CURVATURES`:
    under ``kfac`` the rebuilt net's survivors compensate for what was removed); every baseline in
    ``baselines`` is pruned to the same cost as pyrozoo's net and given the same ``finetune_steps`` of Adam at
    ``lr``, decayed by ``lr_schedule`` (:data:`~pyrozoo.baselines.LR_SCHEDULES`: ``cosine`` to zero by default,
    so that each net ends near an optimum rather than where the last noisy steps left it). Fine-tuning and the
    test metrics run on ``device`` (e.g. ``"cuda"``); the Laplace fit, pruning and the costs (latency on the
    CPU) on the CPU. With ``calibrate`` > 0, that many test inputs (drawn by ``seed``) are held out: every net,
    the dense one's copy included, gets the temperature that fits them best, folded into its head
    (:mod:`pyrozoo.calibration`), and the metrics are read on the other test inputs. Latencies are timed on
    ``threads`` torch threads (1, as the command does: on the thread's CPU clock; None: as many as torch has
    now, on the wall clock); the fit, the fine-tunes and the metrics run on as many as torch has now. ``net`` is
    not changed. Each step is said through ``log`` (``print``; ``lambda text: None`` for silence), and
    ``progress=False`` turns the progress bars off.

    Called by every process of a distributed run (``torch.distributed`` initialised, e.g. by
    :func:`pyrozoo.distributed.setup` under ``torchrun``), the processes share the Laplace fit's batches, the
    fine-tunes' minibatches (gradients summed over them: the one-process step) and the test set; the first times
    the latencies for all, so that every decision is the same in each, and alone logs and shows progress. Each
    returns the same result."""
    targets = as_targets(target)
    _check_options(
        baselines, allocation, score, finetune_steps, batch_size, lr_schedule, min_width, repeats, threads
    )
    # fmt: off
    asked = dict(finetune_steps=finetune_steps, lr=lr, lr_schedule=lr_schedule, batch_size=batch_size,
                 fit_size=fit_size, repeats=repeats, seed=seed, allocation=allocation, min_width=min_width,
                 device=device, score=score, calibrate=calibrate)
    # fmt: on
    if curvature not in CURVATURES:
        raise PyrozooError(f"unknown curvature {curvature!r}; known: {', '.join(CURVATURES)}")
    check_device(device)
    world = current()
    world.check_batch(batch_size)
    device = world.device(device)  # with cuda and several processes: the GPU of this one's local rank
    if not world.main:
        progress, log = False, lambda text: None
    full = _data(data)
    d, held_out = _held_out(full, calibrate, seed)
    training = net.training
    # read only (every method prunes and tunes a copy): a large net is not held twice; one on a GPU is copied
    on_cpu = all(p.device.type == "cpu" for p in net.parameters())
    dense = (net if on_cpu else copy.deepcopy(net).cpu()).eval()
    global_order = any(floored(allocation, t) for t in targets)
    if min_width != MIN_WIDTH and not global_order:
        log(f"min_width {min_width:g} is used by a global allocation only, and no target here has one")
    example = {1: full.x_test[:1], 256: full.x_test[:256]}  # a batch of 256 whatever is held out
    options = (finetune_steps, lr, lr_schedule, batch_size, seed, allocation, score, min_width, device, world)
    job = _Job(d, dense, example, repeats, *options, held_out=held_out, compute_threads=torch.get_num_threads())
    timing = threads or job.compute_threads
    fit = dict(fit_size=fit_size, progress=progress, seed=seed, world=world)
    with costs.torch_threads(timing):
        curvature, nets, table = _compressed(job, targets, baselines, curvature, global_order, fit, log)
    net.train(training)
    net_class = f"{type(net).__module__}.{type(net).__qualname__}"  # what state_dict.pt loads into, resized
    recorded = {"net_class": net_class, **asked, "curvature": curvature, "threads": timing}
    record = _record(full, targets, baselines, recorded, world)
    return Compressed(nets, table, table[0], record, full.x_test[:2])


def _compressed(job: _Job, targets, baselines, curvature: str, global_order: bool, fit: dict, log):
    """:func:`compress`'s work once its job is set: the Laplace fit (options ``fit``), the references, and per
    target pyrozoo's net and each baseline's, then every row's latency; returns ``(curvature as fitted, nets,
    table)``."""
    start = time.perf_counter()
    with job.computing():
        curvature, model, posterior, shares = _fitted(job.dense, job.d.x_train, curvature, global_order, fit, log)
    job.head = next(layer for layer in model.layers if layer.is_output).name
    keep = [job.dense.get_submodule(job.head)]
    fitted = time.perf_counter() - start
    table = _references(job, log)
    nets = {}
    steps = tqdm(total=len(targets) * (1 + len(baselines)), desc="compress", disable=not fit["progress"])
    for t in targets:
        small, row = _pyrozoo(job, model, posterior, t, fitted, log, shares)
        nets[str(t)] = small
        table.append(row)
        steps.update()
        for name in baselines:
            table.append(_baseline(job, name, t, small, keep))
            steps.update()
    steps.close()
    log("timing every net in turns...")
    _time_rows(job)
    return curvature, nets, table


def _record(d, targets: list[Target], baselines, options: dict, world: World) -> dict:
    """How :func:`compress` made its table, as the report records it: the data, targets, baselines and
    ``options`` (the Laplace posterior's curvature as fitted, the threads latency was timed on), the processes,
    machine and date."""
    import datetime
    import os
    import platform

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return {
        "data": getattr(d, "name", "tensors"),
        "targets": [str(t) for t in targets],
        "baselines": list(baselines),
        **options,
        "processes": world.size,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores{gpu}",
        "date": datetime.date.today().isoformat(),
    }


def check_reached(table: list[dict]) -> None:
    """Raise :class:`~pyrozoo.errors.TargetNotReached` naming every target of ``table`` that pyrozoo's net
    missed (the report and nets are written first, so a script can still read them)."""
    missed = [row for row in table if not row.get("reached", True)]
    if missed:
        said = ", ".join(
            f"{row['target']} ({row['search_cost']:.3f} with every removable unit gone)" for row in missed
        )
        raise TargetNotReached(f"not reached: {said}; the report says what may reach it")


def _threads(count: int) -> str:
    return f"{count} thread" + ("" if count == 1 else "s")


def _processes(record: dict) -> str:
    size = record.get("processes", 1)
    return f" x {size} processes (torchrun)" if size > 1 else ""


def _schedule(record: dict) -> str:
    """How the report's fine-tune moved its learning rate (reports before the option held it constant)."""
    return LR_SCHEDULE_WORDS[record.get("lr_schedule", "constant")]


GPU_COLUMNS = ("gpu_latency_b1", "gpu_latency_b256")  # where compress found a GPU


def markdown(table: list[dict], record: dict | None = None) -> str:
    """The report's table in Markdown: one row per method and target, costs as fractions of the dense net;
    with ``record``, the command, data, machine and date above it."""
    dense = table[0]
    lines = []
    if record:
        lines += [f"`{record['command']}`", ""] if "command" in record else []
        lines += [
            f"{record['data']}, {record['machine']}, {_threads(record['threads'])}{_processes(record)}, "
            f"{record['date']}. pyrozoo ranked units by {record.get('score', 'obd')} under a "
            f"{record.get('curvature', 'diag')} Laplace posterior. Every method but the dense "
            "net was fine-tuned "
            f"for {record['finetune_steps']} Adam steps after pruning, learning rate {record.get('lr', 1e-3):g} "
            f"{_schedule(record)} (on {record.get('device', 'cpu')}); "
            "latency is a ratio to the dense net's at batch 1 and 256, timed in turns in one process on the CPU"
            f"{' (and on the GPU)' if GPU_COLUMNS[0] in dense else ''}; a latency target is read at batch 256 on "
            f"the CPU.{_calibration_words(record)}",
            "",
        ]
    gpu = [c for c in GPU_COLUMNS if c in dense]
    lines += [
        "| method | target | accuracy | before fine-tune | NLL | ECE | parameters | FLOPs | latency b1 | latency b256 |"
        + "".join(f" GPU latency b{c.rpartition('b')[2]} |" for c in gpu),
        "|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(gpu),
    ]
    for row in table:
        params = f"{row['params']:,} ({row['params'] / dense['params']:.2f})"
        nonzero = row.get("nonzero_params", row["params"])
        if nonzero != row["params"]:  # unstructured pruning (global magnitude): zeros at the dense shapes
            params += f", {nonzero:,} non-zero ({nonzero / dense['params']:.2f})"
        lines.append(
            f"| {row['method']} | {row['target']}{'' if row.get('reached', True) else ' (not reached)'} | "
            f"{row['accuracy']:.4f} | {_untuned(row)} | {row['nll']:.4f} | {row['ece']:.4f} | "
            f"{params} | {row['flops'] / dense['flops']:.2f} | {row['latency_b1']:.2f} | {row['latency_b256']:.2f} |"
            + "".join(f" {row[c]:.2f} |" for c in gpu)
        )
    return "\n".join(lines + _legend(dense) + _notes(table)) + "\n"


def _legend(dense: dict) -> list[str]:
    """What the table's columns are read on (reports before it was recorded: nothing)."""
    if "test_inputs" not in dense:
        return []
    return [
        "",
        f"Accuracy, NLL and ECE (20 bins of equal count) are read on {dense['test_inputs']:,} test inputs; "
        "\"before fine-tune\" is a pruned net's accuracy as pruning left it (for dense+finetune, the dense net's); "
        "parameters are counted, FLOPs and latencies are fractions of the dense net's" + _dense_latency(dense) + "; "
        "a latency target is read on the CPU at batch 256 (latency b256).",
    ]


def _dense_latency(dense: dict) -> str:
    """The legend's words on the dense net's own latency (reports before it was recorded: nothing)."""
    if "latency_ms_b1" not in dense:
        return ""
    return (
        f" (the dense net's: {dense['latency_ms_b1']:.3g} ms per pass at batch 1 and {dense['latency_ms_b256']:.3g} "
        f"ms at batch 256 on the CPU, {dense['latency_clock']})"
    )


def _calibration_words(record: dict) -> str:
    """The report's sentence on the held-out test inputs, where ``--calibrate`` held some out."""
    count = record.get("calibrate", 0)
    if not count:
        return ""
    return (
        f" {count:,} test inputs (drawn by the seed) were held out to fit each net's temperature, folded into its "
        "last layer; the metrics are read on the other test inputs."
    )


def _at(row: dict) -> str:
    """" at TARGET" for a pruned net's row, nothing for the references'."""
    return "" if row["target"] == "-" else f" at {row['target']}"


def _untuned(row: dict) -> str:
    """A pruned net's accuracy before its fine-tune (what pruning alone left; the dense net's for
    ``dense+finetune``); "-" for the dense net and for reports written before it was recorded."""
    return f"{row['untuned_accuracy']:.4f}" if "untuned_accuracy" in row else "-"


def _notes(table: list[dict]) -> list[str]:
    """Below the table: per target how pyrozoo shared its removals out and what its search read, and what each
    baseline was matched to pyrozoo's net by (the cost as that baseline's search read it against pyrozoo's).
    """
    notes, dense = [], table[0]
    for row in table:
        kind = row["target"].partition("=")[0]
        kind = "params" if kind == "evidence" else kind
        if row["method"] == "pyrozoo" and "search_cost" in row:
            shared = {"global": "globally", "uniform": "uniformly"}[row["allocation"]]
            floor = f", {_floor_words(row['min_width'])}" if "min_width" in row else ""
            note = f"- {row['target']}: pyrozoo's units shared out {shared}{floor}; "
            note += "it kept " if row["target"] == "evidence" else "its search read "
            note += f"{row['search_cost']:.3f} of the dense net's {kind}"
            if row.get("search_readings"):
                note += f" ({row['search_readings']} candidates measured)"
            if not row.get("reached", True):
                hint = _floor_hint(row["allocation"], row.get("min_width", 0))
                note += f": **not reached** with every removable unit gone{hint}"
            notes.append(note + ".")
        elif "matched_by" in row:
            what = row["matched_by"]
            if "matched" in row:
                what += f", {row['matched']:.3f} of its {row['matched_by']} as the match read it"
            if row["params"] == dense["params"] and row["nonzero_params"] == dense["params"]:
                what += " (not pruned: the dense net itself is within pyrozoo's cost)"
            notes.append(f"- {row['target']}: {row['method']}, matched to pyrozoo's net by {what}.")
    tempered = [row for row in table if "temperature" in row]
    if tempered:
        said = ", ".join(f"{row['method']}{_at(row)} {row['temperature']:.3f}" for row in tempered)
        notes.append(f"- Temperatures (each net's logits divided by its own, fitted on the held-out inputs): {said}.")
    if any(row["target"].startswith("latency") for row in table):
        matched = any(row.get("matched_by") == "latency" for row in table)
        notes += [
            "",
            (
                "A latency target's baseline is the least pruned net no costlier than pyrozoo's, each candidate's "
                "latency timed in turns with pyrozoo's net. "
                if matched
                else ""
            )
            + "Latency is read on the timing thread's CPU clock with one thread (the time other jobs hold the core "
            "left out), on the wall clock with more. pyrozoo's search aims "
            f"{LATENCY_MARGIN:.0%} below a latency target, so that its net still meets the target when read again. "
            "The table's latencies are read again at the end, every net in one round-robin, so they differ a "
            "little from what each search read: the search chose the net, the table compares the nets. A higher "
            "--repeats steadies both.",
        ]
    return ["", *notes] if notes else []


# what a report folder holds: an earlier report is replaced whole, a folder holding anything else is refused
REPORT_FILES = frozenset({"report.json", "report.md", "front.png", "front.pdf", "nets"})


def write_report(result: Compressed, folder, record: dict, example: torch.Tensor) -> None:
    """Write ``folder`` whole (atomically): ``report.json`` (``record``, the table), ``report.md``, the figure
    ``front.{png,pdf}``, and per target ``nets/TARGET/``: the compressed net's ``state_dict.pt``, the net
    saved whole (``net.pt``, opened with ``torch.load(..., weights_only=False)`` or ``--trust-pickle``) and a
    ``torch.export`` program (``net.pt2``)."""
    import json
    from pathlib import Path

    import pandas as pd

    from pyrozoo.export import save_net
    from pyrozoo.io import atomic_write_folder
    from pyrozoo.plots import plot_front

    def write(tmp: Path) -> None:
        (tmp / "report.json").write_text(json.dumps({**record, "table": result.table}, indent=2))
        (tmp / "report.md").write_text(markdown(result.table, record))
        plot_front(pd.DataFrame(result.table), tmp)
        for name, net in result.nets.items():
            where = tmp / "nets" / name.replace("=", "-")
            where.mkdir(parents=True)
            save_net(net, example, where / "state_dict.pt", where / "net.pt", where / "net.pt2")

    atomic_write_folder(folder, write, REPORT_FILES)
