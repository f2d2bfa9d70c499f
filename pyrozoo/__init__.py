"""pyrozoo: a Pyro model zoo for Bayesian sparsification with Bayesian model reduction."""

# Importing pyrozoo changes no global state: Pyro's settings and param store stay as the user left them
# (pyrozoo's autoguides switch on module-local params only inside their own calls, see pyrozoo.guides.auto).

__version__ = "0.1.0"

# ``pyrozoo.predict(model, guide, x)``: per-input predictions with their uncertainty. The name is the function;
# the module's other helpers are imported by ``from pyrozoo.predict import ...``.
from pyrozoo.predict import predict  # noqa: E402

# ``pyrozoo.compress(net, data, target="latency=0.5")``: a trained net in, a smaller one out, beside the baselines
# (the module's other names by ``from pyrozoo.compress import ...``).
from pyrozoo.compress import compress  # noqa: E402

__all__ = ["__version__", "compress", "predict"]
