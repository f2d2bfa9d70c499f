"""Posterior sources: where BMR's posterior comes from after training, registered by name.

``pyrozoo prune --posterior``, ``export --pruned``, ``sweep`` (its ``bmr-NAME`` methods), ``predict --pruned``
and ``uncertainty --pruned`` take any registered source (:class:`~pyrozoo.posteriors.base.PosteriorSource`).
A new source is one file in this folder and one import line below.
"""

from pyrozoo.posteriors.base import (  # noqa: F401
    POSTERIORS,
    FittedSource,
    PosteriorSource,
    Pruned,
    Variant,
    make_source,
    register_posterior,
)

# one line per source: importing the file registers it
from pyrozoo.posteriors import run  # noqa: F401, E402
from pyrozoo.posteriors import laplace_diag  # noqa: F401, E402
from pyrozoo.posteriors import laplace_kfac  # noqa: F401, E402

OWN = run.RunPosterior.name  # the run's own posterior: the commands' default source
