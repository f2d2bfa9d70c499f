"""pyrozoo leaves Pyro's global state (settings, param store) as the user had it, so other Pyro code, such as
TyXe, works in the same process; and its guides keep their parameters to themselves."""

import subprocess
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.distributions import constraints

from pyrozoo.elbo import negative_elbo
from pyrozoo.guides import GUIDES, make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.models.priors import flat, gaussian
from pyrozoo.nets import create_net

KINDS = list(GUIDES)


def _model_for(kind):
    """conftest's tiny MLP, with the fixed gaussian prior for a guide that needs one (IVON: its weight decay)."""
    prior = gaussian if GUIDES[kind].fixed_prior else flat
    return BayesianModel(create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(5, 4)), prior)


@pytest.fixture
def tiny_mlp_model(kind):
    return _model_for(kind)


def _train(model, guide, batch) -> None:
    """A few SVI steps, as training takes them: these are what once touched Pyro's global state."""
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        negative_elbo(model, guide, *batch, 60).backward()
        optimizer.step()


def test_importing_pyrozoo_leaves_pyro_settings_alone():
    code = (
        "import pyro; before = pyro.settings.get(); "
        "import pyrozoo, pyrozoo.guides, pyrozoo.train, pyrozoo.cli; "
        "assert pyro.settings.get() == before, pyro.settings.get()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("kind", KINDS)
def test_using_a_guide_leaves_pyro_global_state_alone(kind, tiny_mlp_model, tiny_batch):
    pyro.clear_param_store()
    before = pyro.settings.get()
    guide = make_guide(kind, tiny_mlp_model, *tiny_batch, 60)
    _train(tiny_mlp_model, guide, tiny_batch)
    guide(*tiny_batch, 60)
    guide.mean(), guide.median(), guide.posterior()
    assert pyro.settings.get() == before and pyro.settings.get("module_local_params") is False
    assert len(pyro.get_param_store()) == 0  # our parameters live in our guides, not in Pyro's global store


@pytest.mark.parametrize("kind", KINDS)
def test_two_guides_keep_separate_values(kind, tiny_mlp_model, tiny_batch):
    first, second = make_guide(kind, tiny_mlp_model), make_guide(kind, tiny_mlp_model)
    second.load_state_dict(first.state_dict())
    untouched = second.posterior()
    _train(tiny_mlp_model, first, tiny_batch)
    second(*tiny_batch, 60)  # a shared store would hand the second guide the first one's values here
    for site, (loc, scale) in second.posterior().items():
        assert torch.equal(loc, untouched[site][0]) and torch.equal(scale, untouched[site][1])
    assert not torch.equal(first.posterior()[site][0], loc)


class _UserGuide(PyroModule):
    """A user's own guide, as TyXe's are: a plain nn.Parameter and a constrained PyroParam."""

    def __init__(self):
        super().__init__()
        self.loc = nn.Parameter(torch.tensor(0.0))
        self.scale = PyroParam(torch.tensor(1.0), constraint=constraints.positive)

    def forward(self, y):
        return pyro.sample("mu", dist.Normal(self.loc, self.scale))


def _user_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def test_a_users_pyro_module_trains_with_the_global_param_store_after_our_guides(tiny_batch):
    """With module-local params switched on for the whole process (as pyrozoo once did on import), Pyro's SVI
    fails here with "'Parameter' object has no attribute 'unconstrained'" (TyXe's failure)."""
    for kind in KINDS:  # our guides first, in the same process
        model = _model_for(kind)
        guide = make_guide(kind, model, *tiny_batch, 60)
        _train(model, guide, tiny_batch)
        guide.median()
    pyro.clear_param_store()
    y = torch.tensor([1.0, 2.0, 1.5, 2.5])
    user_guide = _UserGuide()
    svi = SVI(_user_model, user_guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(300):
        svi.step(y)
    # exact posterior of mu: N(sum(y) / (n + 1), 1 / (n + 1)) = N(1.4, 0.2)
    assert abs(float(user_guide.loc.detach()) - 1.4) < 0.25
    assert {"loc", "scale"} <= set(pyro.get_param_store().keys())  # trained through the global param store
    pyro.clear_param_store()
