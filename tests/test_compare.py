"""Tests for pyrozoo.compare and pyrozoo.baselines: the grid, its resume, its tidy table, config files, and the
magnitude-pruning baseline.

Grids train the default MLP on the bundled 4000/1000-image subset for an epoch or two of 3 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from pyrozoo import compare
from pyrozoo.baselines import BASELINES, finetune, magnitude_prune
from pyrozoo.bind import bind
from pyrozoo.cli import main
from pyrozoo.compare import RESULTS, TABLE, make_grid, read_config, run_grid
from pyrozoo.errors import PyrozooError
from pyrozoo.loop import Callback
from pyrozoo.methods import METHODS
from pyrozoo.metrics import evaluate_net
from pyrozoo.models import BayesianModel
from pyrozoo.nets import create_net
from pyrozoo.train import Run

TINY = dict(epochs=1, steps_per_epoch=3, batch_size=32, samples=2)
EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def tiny_grid(out, methods, **settings):
    return make_grid(
        **{
            "nets": ["mlp"],
            "methods": methods,
            "data": ["fashion-mnist-mini"],
            "out": out,
            **TINY,
            **settings,
        }
    )


class Calls:
    """Stands in for compare.train_run: records each run it is asked for, optionally raising on the n-th."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls, self.interrupt_at = [], interrupt_at

    def __call__(self, config, folder, resume, progress):
        self.calls.append((folder.name, resume))
        if len(self.calls) == self.interrupt_at:
            raise KeyboardInterrupt
        with Run(config, folder, resume=resume, log=print) as run:
            run.train(progress=False)


# --- resume -------------------------------------------------------------------------------------------------


def test_an_interrupted_grid_finishes_the_rest_without_redoing_the_first_run(tmp_path, monkeypatch):
    grid = tiny_grid(tmp_path, ["flat-map"], seeds=[0, 1, 2])
    first, second, third = (tmp_path / f"mlp-flat-map-fashion-mnist-mini-s{s}" for s in (0, 1, 2))
    interrupted = Calls(interrupt_at=2)
    monkeypatch.setattr(compare, "train_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, progress=False)
    assert interrupted.calls == [(first.name, False), (second.name, False)]
    assert (first / "metrics.csv").exists() and not (second / "metrics.csv").exists()
    stamp, content = (first / "metrics.csv").stat().st_mtime_ns, (first / "checkpoint.pt").read_bytes()

    again = Calls()
    monkeypatch.setattr(compare, "train_run", again)
    results = run_grid(grid, progress=False)
    assert again.calls == [(second.name, False), (third.name, False)]  # the first is not redone
    assert (first / "metrics.csv").stat().st_mtime_ns == stamp
    assert (first / "checkpoint.pt").read_bytes() == content
    assert sorted(results["seed"]) == [0, 1, 2]

    monkeypatch.setattr(compare, "train_run", Calls(interrupt_at=1))  # a finished grid trains nothing
    assert run_grid(grid, progress=False).equals(results)


def test_a_run_killed_mid_way_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    grid = tiny_grid(tmp_path, ["flat-map"], seeds=[0, 1], epochs=2)
    count = []

    class KilledInTheSecondRunsSecondEpoch(Callback):
        def after_step(self, loop, loss):
            count.append(1)
            if len(count) == 6 + 3 + 1:  # run 1: 6 steps; run 2: epoch 1 = 3 steps, then killed
                raise KeyboardInterrupt

    def killing(config, folder, resume, progress):
        with Run(config, folder, resume=resume, log=print) as run:
            run.train(progress=False, more=[KilledInTheSecondRunsSecondEpoch()])

    monkeypatch.setattr(compare, "train_run", killing)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, progress=False)
    second = tmp_path / "mlp-flat-map-fashion-mnist-mini-s1"
    assert list(pd.read_csv(second / "metrics.csv")["epoch"]) == [1]

    calls = Calls()
    monkeypatch.setattr(compare, "train_run", calls)
    run_grid(grid, progress=False)
    assert calls.calls == [(second.name, True)]
    assert list(pd.read_csv(second / "metrics.csv")["step"]) == [3, 6]
    assert torch.load(second / "checkpoint.pt", weights_only=False)["epoch"] == 2


def test_a_folder_holding_another_run_is_an_error_and_old_configs_are_read(tmp_path, monkeypatch):
    grid = tiny_grid(tmp_path, ["bmr-ss"])
    run_grid(grid, progress=False)
    path = tmp_path / "mlp-bmr-ss-fashion-mnist-mini-s0" / "config.json"
    record = json.loads(path.read_text())
    calls = Calls()
    monkeypatch.setattr(compare, "train_run", calls)

    # Written by an older pyrozoo: no warmup_steps, prior_options, rule_options (their defaults are what this
    # grid asks for); and evaluated on another schedule, which never changes what a run learns.
    old = dict(record["config"], eval_every=7)
    for key in ("warmup_steps", "prior_options", "rule_options"):
        del old[key]
    path.write_text(json.dumps({**record, "config": old}))
    run_grid(grid, progress=False)
    assert calls.calls == []

    with pytest.raises(PyrozooError, match="warmup_steps None there, 0 requested"):
        run_grid(tiny_grid(tmp_path, ["bmr-ss"], warmup_steps=0), progress=False)
    path.write_text(json.dumps({**record, "config": dict(record["config"], lr=0.5)}))
    with pytest.raises(PyrozooError, match=r"holds a different run \(lr 0.5 there, 0.01 requested\)"):
        run_grid(grid, progress=False)
    path.write_text(json.dumps({**record, "config": dict(record["config"], frobnicate=1)}))
    with pytest.raises(PyrozooError, match="frobnicate"):
        run_grid(grid, progress=False)
    assert calls.calls == []


# --- results ------------------------------------------------------------------------------------------------


def test_results_table_and_matched_magnitude_baseline(tmp_path):
    methods = ["flat-map", "bmr-ss", "magnitude", "magnitude-ft"]
    grid = tiny_grid(tmp_path, methods, seeds=[0, 1], epochs=2, eval_every=2, finetune_steps=4)
    results = run_grid(grid, progress=False)

    assert results.equals(pd.read_csv(tmp_path / RESULTS))
    assert list(results.columns[:4]) == ["data", "net", "method", "seed"]
    assert {"epoch", "step", "seconds", "accuracy", "nll", "ece", "ece15", "brier", "pruned_fraction"} <= set(
        results.columns
    )
    # one row per run and epoch: 2 methods x 2 seeds x 2 epochs, and one row per baseline and seed
    assert len(results) == 2 * 2 * 2 + 2 * 2
    assert not results.duplicated(["data", "net", "method", "seed", "epoch"]).any()
    counts = results.groupby("method", sort=False).size()
    assert counts.to_dict() == {"flat-map": 4, "bmr-ss": 4, "magnitude": 2, "magnitude-ft": 2}
    final = results.groupby(["method", "seed"]).tail(1).set_index(["method", "seed"])
    assert final["accuracy"].notna().all()

    # Without a BMR pass (warm-up 500 > 6 steps) bmr-ss prunes nothing, so magnitude pruning to its sparsity
    # leaves the rebuilt MAP net as it was: the same metrics as the flat-map run, through another code path.
    for seed in (0, 1):
        assert final.loc[("bmr-ss", seed), "pruned_fraction"] == 0
        for column in ("accuracy", "nll", "ece", "brier"):
            assert final.loc[("magnitude", seed), column] == pytest.approx(
                final.loc[("flat-map", seed), column], abs=1e-6
            )
        assert final.loc[("magnitude-ft", seed), "step"] == 6 + 4

    summary = compare.final_table(results)
    assert list(summary["method"]) == methods and (summary["seeds"] == 2).all()
    text = compare.summary_markdown(results)
    assert "order flat-map / bmr-ss / magnitude / magnitude-ft" in text
    row = next(line for line in text.splitlines() if line.startswith("| mlp |"))
    assert row.count(" / ") == 4 * 3  # four methods in each of accuracy, ECE, NLL, pruned
    assert "±" in text  # two seeds: a spread


def test_magnitude_baselines_prune_to_the_bmr_runs_sparsity(tmp_path):
    grid = tiny_grid(tmp_path, ["flat-map", "bmr-ss", "magnitude", "magnitude-layer"])
    run_grid(grid, progress=False)
    # Pretend bmr-ss reached 60%: the baseline follows its committed metrics, which its checkpoint holds (a
    # changed target is a new baseline).
    checkpoint = tmp_path / "mlp-bmr-ss-fashion-mnist-mini-s0" / "checkpoint.pt"
    state = torch.load(checkpoint, weights_only=False)
    state["history"][-1]["pruned_fraction"] = 0.6
    torch.save(state, checkpoint)
    with pytest.raises(PyrozooError, match="fraction 0.0 there, 0.6 requested"):
        run_grid(grid, progress=False)
    for method in ("magnitude", "magnitude-layer"):
        (tmp_path / f"mlp-{method}-fashion-mnist-mini-s0" / "config.json").unlink()
    final = run_grid(grid, progress=False).set_index("method")
    for method in ("magnitude", "magnitude-layer"):
        row = final.loc[method]
        assert row["masked_fraction"] == pytest.approx(0.6, abs=1e-5)
        assert row["pruned_fraction"] >= row["masked_fraction"] - 1e-9  # dead units can only add to it
        assert 0 <= row["accuracy"] <= 1 and row["nll"] > 0
        layers = pd.read_csv(tmp_path / f"mlp-{method}-fashion-mnist-mini-s0" / "layers.csv")
        assert len(layers) == 4 and "head" not in set(layers["layer"])  # the hidden layers only
        kept = (layers["kept"] * layers["entries"]).sum() / layers["entries"].sum()
        assert kept == pytest.approx(1 - row["masked_fraction"], abs=1e-6)
        if method == "magnitude-layer":
            assert layers["kept"].to_numpy() == pytest.approx(0.4, abs=1e-3)
    assert final.loc["magnitude", "nll"] != final.loc["magnitude-layer", "nll"]  # other entries pruned


def latent(net, layer) -> torch.Tensor:
    """A layer's weight and bias as one (out, fan_in + 1) matrix, as BMR's masks see it."""
    module = net.get_submodule(layer.name)
    return torch.cat(
        [module.weight.detach().reshape(len(module.weight), -1), module.bias.detach()[:, None]], 1
    )


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.77, 1.0])
def test_magnitude_prune_is_exact_and_spares_the_output_layer(fraction, scope):
    torch.manual_seed(0)
    net = create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(7, 5))
    model = BayesianModel(net)
    head_before = net.head.weight.detach().clone()
    before = {layer.name: latent(net, layer).abs() for layer in model.layers if layer.prunable}
    masks = magnitude_prune(net, model.layers, fraction, scope)

    total = sum(m.numel() for m in masks.values())
    pruned = sum(int((~m).sum()) for m in masks.values())
    if scope == "global":
        assert pruned == round(fraction * total)
    else:  # each layer rounds on its own
        assert abs(pruned - fraction * total) <= len(masks) / 2
    assert set(masks) == {layer.name for layer in model.layers if layer.prunable} and "head" not in masks
    assert torch.equal(net.head.weight, head_before) and not hasattr(net.head, "weight_mask")
    for layer in model.layers:
        if layer.prunable:
            assert masks[layer.name].shape == layer.shape
            weights = latent(net, layer)
            assert torch.equal(weights == 0, ~masks[layer.name])  # the bias column too
    # every pruned magnitude is at most every kept one: across layers (global) or within each layer
    groups = [list(masks)] if scope == "global" else [[name] for name in masks]
    for names in groups:
        removed = torch.cat([before[n][~masks[n]] for n in names])
        kept = torch.cat([before[n][masks[n]] for n in names])
        if len(removed) and len(kept):
            assert removed.max() <= kept.min()
        if scope == "layer":
            assert len(removed) == round(fraction * (len(removed) + len(kept)))

    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 3, (40,))
    finetune(net, x, y, steps=5, lr=0.05, batch_size=8, seed=0)
    for layer in model.layers:
        if layer.prunable:  # fine-tuning moves the survivors and keeps the pruned at zero
            weights = latent(net, layer)
            assert (weights[~masks[layer.name]] == 0).all()
    metrics = evaluate_net(net, x, y, 3, batch_size=16)
    assert 0 <= metrics["accuracy"] <= 1 and metrics["nll"] > 0


# --- config files and the command line ----------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_config_file_and_flags_override_it(tmp_path):
    config = write(
        tmp_path / "grid.toml",
        'out = "somewhere"\nnets = ["mlp", "lenet"]\nmethods = ["flat-ff", "tiered-ff"]\n'
        'data = ["fashion-mnist-mini"]\nseeds = [3, 4]\nfinetune_steps = 7\n'
        "[train]\nepochs = 5\nsteps_per_epoch = 3\nlr = 1\ntau0 = 0.05\neval_every = 2\n"
        "net_options = {hidden = [16]}\n",
    )
    grid = make_grid(config)
    assert (grid.nets, grid.methods, grid.seeds, grid.out, grid.finetune_steps) == (
        ["mlp", "lenet"],
        ["flat-ff", "tiered-ff"],
        [3, 4],
        Path("somewhere"),
        7,
    )
    assert grid.options == {
        "epochs": 5,
        "steps_per_epoch": 3,
        "lr": 1.0,
        "tau0": 0.05,
        "eval_every": 2,
        "net_options": {"hidden": [16]},
    }
    grid = make_grid(config, nets=["lenet"], epochs=1, out="elsewhere")
    assert grid.nets == ["lenet"] and grid.options["epochs"] == 1 and grid.options["lr"] == 1.0
    assert grid.out == Path("elsewhere")
    cells = grid.cells()
    assert [c.name for c in cells] == [
        "lenet-flat-ff-fashion-mnist-mini-s3",
        "lenet-flat-ff-fashion-mnist-mini-s4",
        "lenet-tiered-ff-fashion-mnist-mini-s3",
        "lenet-tiered-ff-fashion-mnist-mini-s4",
    ]
    tiered, flat = grid.config(cells[2]), grid.config(cells[0])
    assert tiered.prior_options == {"tau0": 0.05} and flat.prior_options == {}  # the prior's own options only
    assert (flat.epochs, flat.steps_per_epoch, flat.lr, flat.eval_every, flat.seed) == (1, 3, 1.0, 2, 3)
    assert flat.net_options == {"hidden": [16]}


def test_option_tables_in_a_config_file_reach_the_methods_that_take_them(tmp_path):
    config = write(
        tmp_path / "grid.toml",
        'nets = ["mlp"]\nmethods = ["flat-ff", "bmr-ss", "bmr-th"]\ndata = ["fashion-mnist-mini"]\n'
        "[train]\nprune_units = true\n"
        "[train.rule_options]\ncount_pruned = true\n"
        "[train.prior_options]\nhidden_scale = 0.2\n",
    )
    grid = make_grid(config, rule_options={"max_cutoff": 0})
    ff, ss, th = [grid.config(cell) for cell in grid.cells()]
    assert ss.rule_options == {"count_pruned": True, "max_cutoff": 0.0} and ss.prune_units
    assert th.rule_options == {} and th.prune_units  # threshold takes neither option
    assert ff.rule_options == {} and not ff.prune_units and ff.prior_options == {"hidden_scale": 0.2}
    assert bind(ss).reduction.describe() == (
        "spike-and-slab(count_pruned=True, max_cutoff=0.0, iterations=4, pruned_vote=True, "
        "keep_pruned_posterior=True) then units(margin=0.0)"
    )
    with pytest.raises(PyrozooError, match="rule option 'colour' belongs to no rule of any method"):
        make_grid(config, rule_options={"colour": 1})
    with pytest.raises(PyrozooError, match="net_options must be dict"):
        read_config(write(tmp_path / "bad.toml", "[train]\nnet_options = 3\n"))


@pytest.mark.parametrize(
    "text, words",
    [
        ('nets = ["mlp"]\ncolour = "red"\n', "colour"),
        ('nets = "mlp"\n', "nets must be a list"),
        ("seeds = [0.5]\n", "seeds must be int"),
        ("[train]\nepochs = 2.5\n", "epochs must be int"),
        ("[train]\nspeed = 2\n", "speed"),
        ("nets = [\n", "not valid TOML"),
    ],
)
def test_bad_config_files(tmp_path, text, words):
    with pytest.raises(PyrozooError, match=words):
        read_config(write(tmp_path / "bad.toml", text))


@pytest.mark.parametrize(
    "settings, words",
    [
        (dict(methods=["magnitude", "flat-map"]), "add bmr-ss"),
        (dict(methods=["flat-ff"], tau0=0.1), "--tau0 belongs to the tiered prior"),
        (dict(methods=["flat-ff"], count_pruned=True), "--count-pruned"),
        (dict(methods=["flat-ff"], nets=["resnet"]), "resnet"),
        (dict(methods=[]), "no methods"),
        (dict(methods=["flat-ff", "flat-ff"]), "twice"),
        (dict(methods=["flat-ff"], finetune_steps=-1), "finetune-steps"),
    ],
)
def test_bad_grids(tmp_path, settings, words):
    with pytest.raises(PyrozooError, match=words):
        make_grid(**{"nets": ["mlp"], "data": ["fashion-mnist-mini"], "out": tmp_path, **settings})


@pytest.mark.parametrize("data", ["fashion-mnist", "cifar10", "cifar100"])
def test_the_papers_grids_are_valid(data):
    grid = make_grid(EXPERIMENTS / f"grid-{data}.toml")
    assert grid.data == [data] and grid.nets == ["mlp", "lenet", "vit", "mixer"]
    assert set(grid.training_methods) == {"flat-map", "flat-ff", "tiered-ff", "bmr-ss", "bmr-rhs"}
    assert set(grid.methods) - set(METHODS) == set(BASELINES)
    assert len(grid.cells()) == 4 * 5
    config = grid.config(grid.cells()[0])  # the paper's schedule
    assert (config.epochs, config.steps_per_epoch, config.batch_size) == (50, 500, 120)


def test_compare_command(capsys, tmp_path):
    config = write(
        tmp_path / "grid.toml",
        'nets = ["mlp"]\nmethods = ["flat-ff"]\ndata = ["fashion-mnist-mini"]\n'
        f'out = "{tmp_path / "grid"}"\n[train]\nepochs = 9\nsteps_per_epoch = 3\nbatch_size = 32\nsamples = 2\n',
    )
    argv = ["compare", "--config", str(config), "--epochs", "1", "--no-progress", "--no-plots"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "| net | accuracy | ECE | NLL | pruned fraction |" in out and "| mlp |" in out
    assert (tmp_path / "grid" / TABLE).read_text() in out
    assert list(pd.read_csv(tmp_path / "grid" / RESULTS)["epoch"]) == [1]  # --epochs beat the file's 9

    assert main([*argv, "--lr", "0.1"]) == 2  # the same folder, another run: one clear line
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "holds a different run (lr" in err
    assert main(["compare", "--nets", "mlp", "--out", str(tmp_path / "g2")]) == 2
    assert "no methods" in capsys.readouterr().err


def test_the_table_shows_the_pruned_fraction_of_every_run_that_pruned():
    """A grid's rule can give BMR passes to a method that prunes nothing by itself: its row then shows what it
    pruned, and a method that made no pass shows '-'."""
    from pyrozoo.compare import final_table, paper_table

    rows = [
        dict(data="d", net="mlp", method="flat-ff", seed=0, epoch=1, bmr_seconds=0.1, pruned_fraction=0.4),
        dict(data="d", net="mlp", method="flat-ff", seed=0, epoch=2, bmr_seconds=None, pruned_fraction=0.4),
        dict(data="d", net="mlp", method="flat-map", seed=0, epoch=2, bmr_seconds=None, pruned_fraction=0.0),
    ]
    results = pd.DataFrame([{**r, "accuracy": 0.5, "nll": 1.0, "ece": 0.1} for r in rows])
    final = final_table(results)
    assert final.set_index("method")["prunes"].to_dict() == {"flat-ff": True, "flat-map": False}
    assert "| mlp | .500 / .500 | .100 / .100 | 1.00 / 1.00 | .400 / - |" in paper_table(final, "d")


def test_net_options_reach_the_nets_that_take_them(tmp_path):
    grid = make_grid(
        nets=["mlp", "mixer"], methods=["flat-ff"], data=["fashion-mnist-mini"], net_options={"num_blocks": 1}
    )
    mlp, mixer = (grid.config(cell) for cell in grid.cells())
    assert mlp.net_options == {} and mixer.net_options == {"num_blocks": 1}
    with pytest.raises(PyrozooError, match="net option 'depth' is taken by no net of the grid"):
        make_grid(
            nets=["mlp", "lenet"], methods=["flat-ff"], data=["fashion-mnist-mini"], net_options={"depth": 2}
        )


def test_the_summary_table_shows_short_training_times():
    """ "training s" of a sub-second run is not rounded to 0: whole seconds from 10 s, two digits below."""
    rows = [
        dict(data="d", net="mlp", method=m, seeds=1, prunes=False, pruned_fraction=0.0, seconds=s, epoch=1)
        for m, s in [("a", 0.378), ("b", 0.004), ("c", 5.27), ("d", 123.6), ("e", float("nan"))]
    ]
    lines = compare.long_table(pd.DataFrame(rows)).splitlines()
    times = {line.split("|")[3].strip(): line.split("|")[-4].strip() for line in lines[2:]}
    assert times == {"a": "0.38", "b": "0.004", "c": "5.3", "d": "124", "e": "-"}
