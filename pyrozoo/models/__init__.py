"""Pyro models: a deterministic net plus a prior per layer plus a likelihood."""

from pyrozoo.models.bayesian import BayesianModel
from pyrozoo.models.layers import Layer, find_layers
from pyrozoo.models.likelihoods import LIKELIHOODS, Categorical, Gaussian
from pyrozoo.models.priors import PRIORS, flat

__all__ = [
    "BayesianModel",
    "Categorical",
    "Gaussian",
    "LIKELIHOODS",
    "Layer",
    "PRIORS",
    "find_layers",
    "flat",
]
