"""The live-path guard: no reduction leaves a layer between the input and the output without a live weight.

A rule's decision can empty a layer (a posterior read before it is informative makes every dF positive; a global
target sparsity ranks one layer's entries all above the others'), and a net whose path from the input to the
output is cut computes a constant whatever it "keeps". So every reduction's removals pass through
:func:`spare` unless its option ``allow_empty`` is set: removals are made in the rule's own order of preference
(largest dF first), each unless, with those before it, it would leave a layer that still had a live weight with
none (counting the entries that die with dead or unused units, :func:`~pyrozoo.bmr.units.remove_gone_units`).
What is spared is therefore the removals the evidence favours least, and only as many as a connected path needs.
"""

from __future__ import annotations

from typing import Callable

import torch

from pyrozoo.bmr.units import model_units, remove_gone_units

ALLOW_EMPTY = "rule option allow_empty=true lets it empty"  # how a user asks for what the guard prevents


class Effect:
    """What keep-masks do to the net: the layers they cut (layers that had a live weight under ``live``, bias
    and norm-offset columns aside, which give a constant, and have none left), and the pruned entries per layer,
    once dead and unused units are removed with all their entries (:func:`~pyrozoo.bmr.units.remove_gone_units`
    on masks not yet the model's)."""

    def __init__(self, model, live: dict[str, torch.Tensor]):
        self.layers = model.layers
        self.groups = model_units(model)
        self.others = {
            layer.name: model.mask(layer.name).bool() for layer in self.layers if layer.name not in live
        }
        self.before, _ = self._effective(live)

    def _effective(self, keep: dict[str, torch.Tensor]) -> tuple[set[str], dict[str, int]]:
        masks = remove_gone_units(
            self.groups, {name: mask.clone() for name, mask in {**self.others, **keep}.items()}
        )
        alive = {layer.name for layer in self.layers if bool(masks[layer.name][:, : layer.fan_in].any())}
        return alive, {name: int((~mask).sum()) for name, mask in masks.items()}

    def __call__(self, keep: dict[str, torch.Tensor]) -> tuple[list[str], dict[str, int]]:
        """The layers ``keep`` (masks of some layers, the model's own for the rest) cuts, by name, and the
        effectively pruned entries of each layer."""
        alive, pruned = self._effective(keep)
        return sorted(self.before - alive), pruned


def spare(order: torch.Tensor, cuts: Callable[[torch.Tensor], bool]) -> list[int]:
    """The removals of ``order`` (ids, the most favoured first) to leave out so that the others cut nothing.

    Each removal is made unless, together with those made before it, it would cut (``cuts(ids)``). What a set
    of removals cuts only grows with the set, so the first removal that cuts after a run of made ones is found by
    bisection over the run's length: a few evaluations per spared removal, and one when nothing is spared."""
    spared, made, rest = [], order[:0], order
    while len(rest) and cuts(torch.cat([made, rest])):
        low, high = 0, len(rest)  # making rest[:low] too cuts nothing; rest[:high] cuts
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if cuts(torch.cat([made, rest[:middle]])) else (middle, high)
        made, rest = torch.cat([made, rest[:low]]), rest[low:]
        spared.append(int(rest[0]))
        rest = rest[1:]
    return spared


def keep_live_path(
    model, live: dict[str, torch.Tensor], keep: dict[str, torch.Tensor], scores: dict[str, torch.Tensor]
) -> dict[str, int]:
    """Give back, in the boolean ``keep`` masks (in place), the fewest entries pruned by this decision (``live``
    and not ``keep``) that keep every layer live, sparing those of lowest score first; returns the entries given
    back per layer (none when the decision cuts nothing)."""
    effect = Effect(model, live)
    if not effect(keep)[0]:
        return {}
    names = list(live)
    sizes = [live[n].numel() for n in names]
    flat_live = torch.cat([live[n].flatten() for n in names])
    removed = flat_live & ~torch.cat([keep[n].flatten() for n in names])
    flat_scores = torch.cat([scores[n].flatten() for n in names]).to(torch.float64)
    ids = removed.nonzero().squeeze(1)
    order = ids[flat_scores[ids].argsort(descending=True, stable=True)]

    def cuts(made: torch.Tensor) -> bool:
        candidate = flat_live.clone()
        candidate[made] = False
        parts = candidate.split(sizes)
        return bool(effect({n: p.reshape(live[n].shape) for n, p in zip(names, parts)})[0])

    given = torch.zeros_like(flat_live)
    given[spare(order, cuts)] = True
    counts = {}
    for n, part in zip(names, given.split(sizes)):
        keep[n] |= part.reshape(live[n].shape)
        if bool(part.any()):
            counts[n] = int(part.sum())
    return counts


def spared_note(count: int, what: str = "entries") -> str:
    """The line a layer's report (and the training log) carries when the guard overruled its rule."""
    return (
        f"live-path guard: kept {count} {what} against the rule, the fewest (those whose removal the evidence "
        f"favoured least) that keep a path from the input to the output; {ALLOW_EMPTY}"
    )
