"""pyrozoo.steps: the optimiser each training step builds, and what it refuses."""

import pytest
from torch import nn

from pyrozoo.errors import PyrozooError
from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.models.priors import gaussian
from pyrozoo.steps import STEPS


def _batchnorm_model(**kwargs) -> BayesianModel:
    return BayesianModel(
        nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)), **kwargs
    )


def test_svi_trains_the_guide_and_the_nets_deterministic_parameters():
    model = _batchnorm_model()
    guide = make_guide("meanfield", model)
    optimizer = STEPS["svi"].optimizer(model, guide, 1e-3, "adam", 100)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    batchnorm = model.deterministic_parameters()
    assert len(batchnorm) == 2  # BatchNorm's weight and bias are point estimates
    assert trained == {id(p) for p in [*guide.parameters(), *batchnorm]}


def test_ivon_refuses_a_net_with_deterministic_parameters_it_would_leave_untrained():
    model = _batchnorm_model(prior=gaussian)  # IVON's weight decay is a fixed prior
    with pytest.raises(PyrozooError, match="deterministic parameters .* IVON would leave untrained"):
        STEPS["ivon"].optimizer(model, make_guide("ivon", model), 1e-3, "ivon", 100)
