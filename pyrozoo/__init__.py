"""pyrozoo: a Pyro model zoo for Bayesian sparsification with Bayesian model reduction."""

import pyro

# Parameters of Pyro modules (our guides, Pyro's autoguides) live in their modules, not in Pyro's global
# param store, so two runs or two guides in one process never share or overwrite each other's values.
pyro.settings.set(module_local_params=True)

__version__ = "0.1.0"
