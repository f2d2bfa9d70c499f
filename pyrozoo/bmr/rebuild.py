"""Rebuild: a plain deterministic ``nn.Module`` from a Bayesian model and its guide, optionally smaller."""

from __future__ import annotations

import copy

import torch
from torch import nn

from pyrozoo.bmr.check import check_posterior
from pyrozoo.bmr.units import remove_dead_units


@torch.no_grad()
def rebuild(model, guide, remove_dead: bool = True) -> nn.Module:
    """The model's net with posterior-mean weights and exact zeros where pruned.

    Weights are ``scale * mask * z`` at the posterior means of the latents (``guide.mean()``). With
    ``remove_dead``, units whose every input or every output weight is pruned (hidden neurons and channels of
    MLP and LeNet, hidden neurons of transformer MLP blocks, attention heads: :mod:`pyrozoo.bmr.units`) are cut
    out with the matching slices downstream, so the net really gets smaller and faster; its outputs do not
    change and its module classes stay the same (a rebuilt timm model is still a timm model).
    """
    check_posterior(model, guide)
    weights = model.weights_from(guide.mean())
    net = copy.deepcopy(model.net)
    for layer in model.layers:
        for name, value in layer.split(weights[layer.name]).items():
            net.get_parameter(name).copy_(value)
    for p in net.parameters():
        p.requires_grad_(True)
    if remove_dead:
        remove_dead_units(net, model)
    return net.eval()


def parameter_count(net: nn.Module, nonzero: bool = False) -> int:
    return sum(int((p != 0).sum()) if nonzero else p.numel() for p in net.parameters())
