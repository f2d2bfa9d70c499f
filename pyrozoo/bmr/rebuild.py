"""Rebuild: a plain deterministic ``nn.Module`` from a Bayesian model and its guide, optionally smaller."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pyrozoo.bmr.check import check_posterior
from pyrozoo.bmr.compact import expand
from pyrozoo.bmr.units import remove_dead_units, structure


@torch.no_grad()
def rebuild(model, guide, remove_dead: bool = True) -> nn.Module:
    """The model's net with posterior-mean weights and exact zeros where pruned.

    Weights are ``scale * mask * z`` at the posterior means of the latents (``guide.mean()``). With
    ``remove_dead``, units whose every input or every output weight is pruned (hidden neurons and channels of
    MLP and LeNet, hidden neurons of transformer MLP blocks, attention heads: :mod:`pyrozoo.bmr.units`) are cut
    out with the matching slices downstream, so the net really gets smaller and faster; a unit left with a
    constant output (a BatchNorm shift) goes where the constant folds into its consumers, and
    ``structure(model).stayed`` says why others stay. Its outputs do not change and its module classes stay the
    same (a rebuilt timm model is still a timm model). A model compacted during training
    (:mod:`pyrozoo.bmr.compact`) is first grown back to its original net.
    """
    check_posterior(model, guide)
    given = model
    model, guide = expand(model, guide)  # a compacted run rebuilds its original net, as its uncompacted twin
    weights = model.weights_from(guide.mean())
    net = copy.deepcopy(model.net)
    for layer in model.layers:
        # popped: the posterior means, a second copy of the weights, are not held through the cut below
        for name, value in layer.split(weights.pop(layer.name)).items():
            net.get_parameter(name).copy_(value)
    for p in net.parameters():
        p.requires_grad_(True)
    if remove_dead:
        remove_dead_units(net, model)
        if model is not given:  # why units stayed is told on the model the caller holds
            stayed = structure(given).stayed
            stayed.clear()
            stayed.update(structure(model).stayed)
    return net.eval()


def parameter_count(net: nn.Module, nonzero: bool = False) -> int:
    return sum(int((p != 0).sum()) if nonzero else p.numel() for p in net.parameters())
