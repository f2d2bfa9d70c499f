"""CONTRIBUTING.md's examples run as written, and what they add is picked up with no other edit: the registry,
its lookups, option checking, the command line and the tools that read the registries."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from clitools import cli
from configs import tiny_config
from test_imports import cycles, imported, modules

from pyrozoo import bmr
from pyrozoo.bind import bind
from pyrozoo.bmr import REDUCTIONS, make_reduction
from pyrozoo.cli import main
from pyrozoo.config import TrainConfig
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.models.priors import PRIORS
from pyrozoo.nets import NETS, create_net
from pyrozoo.posteriors import POSTERIORS, make_source
from pyrozoo.train import Run

GUIDE = (Path(__file__).parent.parent / "CONTRIBUTING.md").read_text()


def example(section: str) -> dict:
    """Run the Python block of the section headed ``section`` and return its namespace."""
    block = re.search(rf"## {re.escape(section)}\n.*?```python\n(.*?)```", GUIDE, re.S).group(1)
    namespace: dict = {}
    exec(compile(block, f"CONTRIBUTING.md: {section}", "exec", dont_inherit=True), namespace)
    return namespace


@pytest.fixture
def registries_restored():
    before = {id(r): dict(r) for r in (REDUCTIONS, PRIORS, NETS, POSTERIORS)}
    yield
    for registry in (REDUCTIONS, PRIORS, NETS, POSTERIORS):
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


def test_a_new_prior(registries_restored, tmp_path):
    ns = example("How to add a prior")
    assert PRIORS["exponential"] is ns["exponential"]
    model = BayesianModel(_mlp().net, prior=PRIORS["exponential"])
    assert {f"{layer.name}.scale" for layer in model.layers} <= set(
        make_guide("meanfield", model).posterior()
    )
    bound = bind(TrainConfig(method="flat-ff", prior="exponential", prior_options={"scale": 5}))
    assert bound.prior.keywords == {"scale": 5.0}
    # it trains to sane numbers: a few steps of the tiny run, its NLL near the chance level's, not exploded
    run = Run(tiny_config(prior="exponential", epochs=1, steps_per_epoch=10), tmp_path, log=lambda text: None)
    assert run.train(progress=False)["nll"].iloc[-1] < 5
    with pytest.raises(PyrozooError, match="prior option 'tau' belongs to no prior"):
        bind(TrainConfig(method="flat-ff", prior="exponential", prior_options={"tau": 5}))


def test_a_new_net(registries_restored):
    example("How to add a net")
    net = create_net("tiny-cnn", in_channels=1, image_size=6, num_classes=3, width=4)
    assert net(torch.zeros(2, 1, 6, 6)).shape == (2, 3)
    assert len(BayesianModel(net).layers) == 3


def test_a_new_posterior():
    ns = example("How to write a posterior")
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


def test_a_new_posterior_source_is_taken_by_every_command(capsys, map_run, registries_restored, tmp_path):
    """The example source, registered by its file alone, through prune, export, sweep, predict and uncertainty."""
    ns = example("How to add a posterior source")
    assert POSTERIORS["cold-laplace"] is ns["ColdLaplace"]
    # placed in pyrozoo/posteriors/ with its import line in the package, it closes no import circle
    block = re.search(r"## How to add a posterior source\n.*?```python\n(.*?)```", GUIDE, re.S).group(1)
    path = tmp_path / "cold_laplace.py"
    path.write_text(block)
    known = modules()
    graph = {
        name: imported(name, file, set(known) | {"pyrozoo.posteriors.cold_laplace"})
        for name, file in known.items()
    }
    graph["pyrozoo.posteriors"].add("pyrozoo.posteriors.cold_laplace")
    graph["pyrozoo.posteriors.cold_laplace"] = imported("pyrozoo.posteriors.cold_laplace", path, set(known))
    assert cycles(graph) == []
    fitted = "--fit-size", "200", "--posterior-option", "temperature=0.25"
    code, out, err = cli(capsys, "prune", "map", "--posterior", "cold-laplace", *fitted, "--sparsity", "0.5")
    assert code == 0, err
    assert "from a cold-laplace posterior" in out and "pruned fraction 0.5000" in out
    state = torch.load(map_run / "pruned-cold-laplace.pt", weights_only=False)
    assert state["posterior"] == "cold-laplace"
    code, out, err = cli(capsys, "export", "map", "--pruned", "cold-laplace", "--repeats", "1")
    assert code == 0, err
    summary = json.loads((map_run / "export" / "summary.json").read_text())
    assert summary["source"]["state"] == "pruned-cold-laplace.pt"
    assert summary["full_shapes"]["accuracy"] == pytest.approx(state["metrics"]["accuracy"], abs=1e-9)
    code, out, err = cli(
        capsys, "predict", "map", "--pruned", "cold-laplace", "--out", "p.csv", "--no-progress"
    )
    assert code == 0, err
    assert "the pruned plain net" in err and f"accuracy {state['metrics']['accuracy']:.4f}" in out
    code, out, err = cli(capsys, "uncertainty", "map", "--pruned", "cold-laplace", "--no-progress")
    assert code == 0, err
    # its own file, beside the trained state's: the pruned state measured is named in it and said
    table = pd.read_csv(map_run / "uncertainty-pruned-cold-laplace.csv")
    assert "uncertainty-pruned-cold-laplace.csv" in err and not (map_run / "uncertainty.csv").exists()
    assert (table.samples == 1).all() and (table.state == "pruned-cold-laplace.pt").all()
    assert table.accuracy[table["shift"] == "none"].item() == pytest.approx(state["metrics"]["accuracy"])
    methods = "--methods", "bmr-cold-laplace", "magnitude"
    code, out, err = cli(capsys, "sweep", "map", *methods, "--sparsities", "0.5", *fitted, "--no-progress")
    assert code == 0, err
    sweep = pd.read_csv(map_run / "sweep" / "sweep.csv")
    assert set(sweep.method) == {"dense", "bmr-cold-laplace", "magnitude"}
    assert "cold-laplace: fitted in" in err
    code, _, err = cli(
        capsys, "prune", "map", "--posterior", "cold-laplace", "--posterior-option", "temperature=0"
    )
    assert code == 2 and "temperature must be positive" in err
    assert main(["info"]) == 0
    assert re.search(
        r"cold-laplace +The diagonal Laplace.*\[options: temperature, fit_size\]", capsys.readouterr().out
    )


def test_the_example_source_sharpens_the_diagonal_laplace_posterior(trained_map_run, registries_restored):
    from pyrozoo.train import Run

    example("How to add a posterior source")
    run = Run.open(trained_map_run, log=lambda text: None)
    _, cold = make_source("cold-laplace", {"temperature": 0.25, "fit_size": 100}).fit(run, progress=False)
    _, plain = make_source("laplace-diag", {"fit_size": 100}).fit(run, progress=False)
    for site, (loc, scale) in plain.posterior().items():
        torch.testing.assert_close(cold.posterior()[site], (loc, scale * 0.5))
