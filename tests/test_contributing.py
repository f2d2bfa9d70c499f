"""CONTRIBUTING.md's examples run as written, and what they add is picked up with no other edit: the registry,
its lookups, option checking, the command line and the tools that read the registries."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pyrozoo.bind import bind
from pyrozoo import bmr
from pyrozoo.bmr import REDUCTIONS, make_reduction
from pyrozoo.cli import main
from pyrozoo.config import TrainConfig
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.models.priors import PRIORS
from pyrozoo.nets import NETS, create_net

GUIDE = (Path(__file__).parent.parent / "CONTRIBUTING.md").read_text()


def example(section: str) -> dict:
    """Run the Python block of the section headed ``section`` and return its namespace."""
    block = re.search(rf"## {re.escape(section)}\n.*?```python\n(.*?)```", GUIDE, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, f"CONTRIBUTING.md: {section}", "exec", dont_inherit=True), namespace)
    return namespace


@pytest.fixture
def registries_restored():
    before = {id(r): dict(r) for r in (REDUCTIONS, PRIORS, NETS)}
    yield
    for registry in (REDUCTIONS, PRIORS, NETS):
        for name in set(registry) - set(before[id(registry)]):
            dict.pop(registry, name)


def _mlp():
    return BayesianModel(create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(6, 5)))


def test_a_new_reduction(capsys, registries_restored):
    ns = example("How to add a reduction")
    reduction = make_reduction("quantile", q=0.5)
    assert isinstance(reduction, ns["Quantile"])
    model = _mlp()
    report = reduction(model, make_guide("meanfield", model))
    first = report.layers[0]
    assert first.live_before - first.kept == pytest.approx(first.live_before / 2, abs=1)
    code = main(["prune", "no-such-run", "--rule", "quantile", "--rule-option", "margin=1"])
    err = capsys.readouterr().err
    assert code == 2 and "reduction 'quantile' takes no option 'margin'; its options: q" in err
    assert main(["info"]) == 0
    assert re.search(r"quantile +Prune, in each layer.*\[options: q\]", capsys.readouterr().out)
    bound = bind(TrainConfig(method="bmr-th", rule="quantile", rule_options={"q": 0.8}))
    assert bound.reduction == ns["Quantile"](0.8)


def test_a_new_prior(registries_restored):
    ns = example("How to add a prior")
    assert PRIORS["exponential"] is ns["exponential"]
    model = BayesianModel(_mlp().net, prior=PRIORS["exponential"])
    assert {f"{layer.name}.scale" for layer in model.layers} <= set(
        make_guide("meanfield", model).posterior()
    )
    bound = bind(TrainConfig(method="flat-ff", prior="exponential", prior_options={"rate": 5}))
    assert bound.prior.keywords == {"rate": 5.0}
    with pytest.raises(PyrozooError, match="prior option 'tau' belongs to no prior"):
        bind(TrainConfig(method="flat-ff", prior="exponential", prior_options={"tau": 5}))


def test_a_new_net(registries_restored):
    example("How to add a net")
    net = create_net("tiny-cnn", in_channels=1, image_size=6, num_classes=3, width=4)
    assert net(torch.zeros(2, 1, 6, 6)).shape == (2, 3)
    assert len(BayesianModel(net).layers) == 3


def test_a_new_posterior_source():
    ns = example("How to add a posterior source")
    model = _mlp()
    trained = make_guide("meanfield", model)
    source = ns["FixedNormal"](model, trained.posterior())
    assert not source.point_mass
    torch.testing.assert_close(source.mean(), trained.mean())
    report = bmr.prune(model, source, "threshold")
    assert 0 < report.pruned_fraction < 1
    loc, scale = source.posterior()[model.layers[0].site]
    pruned = ~model.mask(model.layers[0].name).bool()
    assert torch.all(loc[pruned] == 0) and torch.all(scale[pruned] == 1)
    net = bmr.rebuild(model, source)
    assert net(torch.zeros(2, 1, 4, 4)).shape == (2, 3)
