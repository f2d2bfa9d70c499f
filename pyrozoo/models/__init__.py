"""Pyro models: a deterministic net plus a prior per layer plus a likelihood."""

from pyrozoo.models.bayesian import BayesianModel
from pyrozoo.models.layers import Layer, find_layers
from pyrozoo.models.likelihoods import Categorical
from pyrozoo.models.priors import PRIORS, flat

__all__ = ["BayesianModel", "Categorical", "Layer", "PRIORS", "find_layers", "flat"]
