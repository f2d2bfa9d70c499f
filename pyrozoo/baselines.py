"""The baseline a practitioner would otherwise pick: global magnitude pruning of the MAP network.

The ``flat-map`` run's point estimate is rebuilt as a plain ``nn.Module``; its prunable layers (every weight
layer but the output layer, biases included: the set BMR prunes) are pruned with ``torch.nn.utils.prune``
(L1, smallest magnitudes first) to the pruned fraction that the ``bmr-ss`` run of the same net, data and seed
reached, and evaluated with the same metrics: as pruned, and after a short fine-tune of the surviving weights
with the masks kept (``-ft``). ``magnitude`` ranks all prunable entries together
(``global_unstructured``), the usual choice; ``magnitude-layer`` prunes every layer to the same fraction,
which survives layers whose weights are all smaller than the others' (global ranking can empty them).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import prune

from pyrozoo.bmr.units import pruned_fraction
from pyrozoo.distributed import World
from pyrozoo.io import atomic_write, make_folder
from pyrozoo.bmr.rebuild import rebuild
from pyrozoo.errors import PyrozooError
from pyrozoo.models.likelihoods import Categorical
from pyrozoo.registry import Registry
from pyrozoo.data import Minibatches
from pyrozoo.runfolder import CONFIG, METRICS, committed_metrics
from pyrozoo.trained import load


@dataclass(frozen=True)
class Baseline:
    scope: str  # "global": one magnitude ranking over all prunable layers; "layer": each layer on its own
    finetuned: bool
    description: str


BASELINES = Registry("baseline")
BASELINES.register("magnitude", Baseline("global", False, "global magnitude pruning of the flat-map net"))
BASELINES.register("magnitude-ft", Baseline("global", True, "global magnitude pruning, then a fine-tune"))
BASELINES.register("magnitude-layer", Baseline("layer", False, "magnitude pruning of each layer alike"))
BASELINES.register(
    "magnitude-layer-ft", Baseline("layer", True, "magnitude pruning of each layer, then a fine-tune")
)
SOURCE_METHOD, SPARSITY_METHOD = "flat-map", "bmr-ss"
LAYERS = "layers.csv"  # per prunable layer: entries, kept fraction, median |weight| before pruning


def _parameter_names(layer) -> list[str]:
    """The net parameters of a random layer: its weight, then its bias if it has one."""
    return list(layer.split(torch.zeros(layer.shape)))


def _latent(net: nn.Module, layer) -> torch.Tensor:
    """The layer's parameters in the net as one latent-shaped matrix (weight, then the bias as a column)."""
    parts = [net.get_parameter(name).detach().reshape(layer.shape[0], -1) for name in _parameter_names(layer)]
    return torch.cat(parts, dim=1)


def _owner(net: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attribute = name.rpartition(".")
    return (net.get_submodule(path) if path else net), attribute


def magnitude_prune(
    net: nn.Module, layers, fraction: float, scope: str = "global"
) -> dict[str, torch.Tensor]:
    """Prune ``net`` in place: the smallest-magnitude ``fraction`` of the prunable layers' entries (weights and
    biases) are masked to zero with ``torch.nn.utils.prune``, whose masks keep them zero under further
    training; ranked over all those layers at once (``scope="global"``) or in each layer (``"layer"``).
    Returns each prunable layer's keep-mask, shaped like its latent."""
    if not 0 <= fraction <= 1:
        raise PyrozooError(f"a pruned fraction lies in [0, 1], got {fraction}")
    if scope not in ("global", "layer"):
        raise PyrozooError(f"magnitude pruning is global or per layer, not {scope!r}")
    prunable = [layer for layer in layers if layer.prunable]
    groups = [prunable] if scope == "global" else [[layer] for layer in prunable]
    for group in groups:
        targets = [_owner(net, name) for layer in group for name in _parameter_names(layer)]
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=float(fraction))
    masks = {}
    for layer in prunable:
        parts = []
        for name in _parameter_names(layer):
            module, attribute = _owner(net, name)
            mask = getattr(module, attribute + "_mask")
            parts.append(mask.reshape(layer.shape[0], -1))  # a bias becomes the last column, as in the latent
        masks[layer.name] = torch.cat(parts, dim=1).bool()
    return masks


# the fine-tune's learning rate at step s of n, as a factor of lr: held, or decayed along a half cosine to 0
# (a net near an optimum ends nearer one, and the last noisy steps weigh less, so methods compare cleaner)
LR_SCHEDULES = {
    "constant": lambda s, n: 1.0,
    "cosine": lambda s, n: 0.5 * (1 + math.cos(math.pi * s / n)),
}
# each schedule as a report says it
LR_SCHEDULE_WORDS = {"constant": "held", "cosine": "decayed to 0 along a half cosine"}


def finetune(
    net: nn.Module,
    x,
    y,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    likelihood=None,
    world: World | None = None,
    schedule: str = "constant",
) -> None:
    """``steps`` of Adam on the negative log-likelihood (``likelihood``, a point one; the cross-entropy by
    default), on random minibatches, the learning rate ``lr`` times :data:`LR_SCHEDULES` ``[schedule]``;
    pruning masks stay applied. In a run of several processes (``world``,
    every one calling this) each takes its part of every minibatch and the gradients are summed over them
    (:meth:`~pyrozoo.distributed.World.share_gradients`), BatchNorm normalising by the whole minibatch's
    statistics (:meth:`~pyrozoo.distributed.World.batch_statistics`), so all take the one-process step. Dropout
    draws its masks per process (the same law, not the same draws)."""
    if schedule not in LR_SCHEDULES:
        raise PyrozooError(f"unknown learning-rate schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}")
    likelihood = Categorical() if likelihood is None else likelihood
    world = World() if world is None else world
    parameters = [p.requires_grad_(True) for p in net.parameters()]  # the pruned ones' masks stay in force
    optimizer = torch.optim.Adam(parameters, lr=lr)
    factor = LR_SCHEDULES[schedule]
    batches = Minibatches(len(x), batch_size, seed)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), world.batch_statistics(net):
        torch.manual_seed(seed)  # dropout, where the net has it, as in the MAP run's training
        net.train()
        for step in range(steps):
            optimizer.param_groups[0]["lr"] = lr * factor(step, steps)
            i, weight = world.split(batches.next())
            i = i.to(x.device)
            # this process's share b_r / B of the minibatch's mean (the weight before backward, for BatchNorm)
            loss = -likelihood.log_likelihood(net(x[i]), y[i]).mean() * weight
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world.parallel:
                world.share_gradients(loss, optimizer, 1.0)
            optimizer.step()
        net.eval()


def _final_row(folder: Path) -> dict:
    path = folder / METRICS
    if not path.exists():
        raise PyrozooError(f"{folder} has no {METRICS}: train it before its magnitude-pruning baseline")
    rows = committed_metrics(folder)  # the committed epochs only: never a row past the checkpoint
    if rows.empty:
        raise PyrozooError(f"{folder} has no finished epoch: train it before its magnitude-pruning baseline")
    return rows.iloc[-1].to_dict()


def baseline_record(method: str, source: Path, sparsity: Path, finetune_steps: int) -> dict:
    """What defines a baseline cell: its source runs, the sparsity to match and the fine-tune."""
    config = json.loads((source / CONFIG).read_text())["config"]
    return {
        "method": method,
        "scope": BASELINES[method].scope,
        "source": source.name,
        "sparsity_from": sparsity.name,
        "fraction": float(_final_row(sparsity)["pruned_fraction"]),
        "finetune_steps": finetune_steps,
        "lr": config["lr"],
        "batch_size": config["batch_size"],
        "seed": config["seed"],
    }


def baseline_state(folder: Path, method: str, source: Path, sparsity: Path, finetune_steps: int) -> str:
    """``"finished"`` or ``"new"``; a folder holding another baseline is an error."""
    record = baseline_record(method, source, sparsity, finetune_steps)
    path = folder / CONFIG
    if not path.exists():
        return "new"
    stored = json.loads(path.read_text()).get("baseline")
    if stored != record:
        differences = (
            ["not a baseline"]
            if not isinstance(stored, dict)
            else [
                f"{k} {stored.get(k)!r} there, {v!r} requested"
                for k, v in record.items()
                if stored.get(k) != v
            ]
        )
        raise PyrozooError(
            f"{folder} holds a different run ({'; '.join(differences)}); remove it or choose another --out"
        )
    return "finished" if (folder / METRICS).exists() else "new"


def run_baseline(folder: Path, method: str, source: Path, sparsity: Path, finetune_steps: int) -> dict:
    """Prune the ``source`` (flat-map) run's net to the ``sparsity`` (bmr-ss) run's final pruned fraction,
    fine-tune it for ``finetune_steps`` (0: not at all), evaluate, and write ``folder``'s config.json, a
    one-row metrics.csv and layers.csv (what survived in each layer); returns the row."""
    record = baseline_record(method, source, sparsity, finetune_steps)
    make_folder(folder)
    atomic_write(folder / CONFIG, lambda p: p.write_text(json.dumps({"baseline": record}, indent=2)))
    run = load(source, log=lambda text: None)
    trained = _final_row(source)
    start = time.perf_counter()
    net = rebuild(run.model, run.guide, remove_dead=False)
    magnitudes = {layer.name: _latent(net, layer).abs() for layer in run.model.layers if layer.prunable}
    masks = magnitude_prune(net, run.model.layers, record["fraction"], record["scope"])
    entries = sum(m.numel() for m in masks.values())
    masked = 1 - sum(int(m.sum()) for m in masks.values()) / entries
    if record["finetune_steps"]:
        finetune(
            net,
            run.data.x_train,
            run.data.y_train,
            record["finetune_steps"],
            record["lr"],
            record["batch_size"],
            record["seed"],
            run.point_likelihood(),
        )
    seconds = time.perf_counter() - start
    for name, keep in masks.items():  # BMR's pruned fraction, which also counts the weights of dead units
        run.model.set_mask(name, keep)
    start = time.perf_counter()
    metrics = run.net_metrics(net)
    row = {
        "epoch": int(trained["epoch"]),
        "step": int(trained["step"]) + record["finetune_steps"],
        "seconds": round(float(trained["seconds"]) + seconds, 3),
        "baseline_seconds": round(seconds, 3),
        "pruned_fraction": pruned_fraction(run.model),
        "masked_fraction": masked,
        **metrics,
        "eval_seconds": round(time.perf_counter() - start, 3),
    }
    layers = pd.DataFrame(
        [
            {
                "layer": name,
                "entries": keep.numel(),
                "kept": float(keep.float().mean()),
                "median_abs_weight": float(magnitudes[name].median()),
            }
            for name, keep in masks.items()
        ]
    )  # why global ranking empties some layers: their weights are all small
    atomic_write(folder / LAYERS, lambda p: layers.to_csv(p, index=False))
    atomic_write(folder / METRICS, lambda p: pd.DataFrame([row]).to_csv(p, index=False))
    return row
