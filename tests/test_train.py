"""Tests for pyrozoo.train: exact resume, seeding, the run folder's files, errors, guides and minibatches
(divergence: test_divergence.py).

Everything trains a one-hidden-layer MLP (32 units) on the bundled 4000/1000-image subset for a few steps.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math

import pandas as pd
import pytest
import torch
from configs import quiet, tiny_config, with_loss

from pyrozoo.config import TrainConfig
from pyrozoo.data import Minibatches
from pyrozoo.elbo import negative_elbo
from pyrozoo.errors import PyrozooError
from pyrozoo.optim import OPTIMIZERS
from pyrozoo.runfolder import CHECKPOINT, CONFIG, METRICS
from pyrozoo.steps import VALIDATE_ENV, svi_step
from pyrozoo.train import Run

DOCUMENTED_COLUMNS = ["epoch", "step", "seconds", "elbo", "accuracy", "nll", "ece", "ece15", "brier", "lpd"]
EVAL_COLUMNS = ["accuracy", "nll", "ece", "ece15", "brier", "lpd"]


tiny = tiny_config


def train(config: TrainConfig, out, resume: bool = False) -> Run:
    run = Run(config, out, resume=resume, log=quiet)
    run.train(progress=False)
    return run


def assert_same_tensors(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        same = (
            torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key]
        )  # AdaBelief's step
        assert same, key


def assert_same_metrics(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Equal columns and rows, bit for bit, except the wall-clock timings (seconds, eval_seconds, ...)."""
    assert list(a.columns) == list(b.columns)
    timings = [c for c in a.columns if c == "seconds" or c.endswith("_seconds")]
    assert timings and "elbo" not in timings
    pd.testing.assert_frame_equal(a.drop(columns=timings), b.drop(columns=timings), check_exact=True)


def guide_params(run: Run) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in run.guide.state_dict().items()}


# --- resume and seeds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "guide, optimizer", [("meanfield", "adam"), ("autonormal", "adam"), ("meanfield", "adabelief")]
)
def test_resume_is_exact(tmp_path, guide, optimizer):
    straight = train(tiny(guide=guide, optimizer=optimizer, epochs=2), tmp_path / "straight")

    first = train(tiny(guide=guide, optimizer=optimizer, epochs=1), tmp_path / "split")
    assert len(pd.read_csv(tmp_path / "split" / METRICS)) == 1
    resumed = Run(
        tiny(guide=guide, optimizer=optimizer, epochs=2), tmp_path / "split", resume=True, log=quiet
    )
    assert type(resumed.optimizer) is OPTIMIZERS[optimizer]
    assert (resumed.epoch, resumed.step) == (1, 6)
    assert_same_tensors(resumed.guide.state_dict(), first.guide.state_dict())  # reloaded, not re-initialised
    table = resumed.train(progress=False)

    assert (resumed.epoch, resumed.step) == (2, 12)
    assert_same_tensors(guide_params(resumed), guide_params(straight))
    a, b = pd.read_csv(tmp_path / "straight" / METRICS), pd.read_csv(tmp_path / "split" / METRICS)
    assert list(a["epoch"]) == [1, 2]
    assert_same_metrics(a, b)
    assert_same_metrics(table, b)
    # The optimiser's moments came back too, so the two runs would keep going in step.
    sa, sb = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert_same_tensors(sa[key], sb[key])


@pytest.mark.parametrize("method", ["bmr-th", "bmr-ss"])
def test_extending_a_finished_run_is_the_run_asked_for_from_the_start(tmp_path, method):
    """The pass that the old last epoch skipped runs before the extension trains, so the state equals a run
    asked for with the longer schedule from the start, and config.json records the new total."""
    config = tiny(method=method, epochs=3, warmup_steps=0)
    straight = train(config, tmp_path / "straight")
    train(dataclasses.replace(config, epochs=2), tmp_path / "short")
    extended = Run.open(tmp_path / "short", epochs=3, log=quiet)
    extended.train(progress=False)
    assert_same_tensors(guide_params(extended), guide_params(straight))
    assert_same_tensors(dict(extended.model.named_buffers()), dict(straight.model.named_buffers()))
    a, b = pd.read_csv(tmp_path / "straight" / METRICS), pd.read_csv(tmp_path / "short" / METRICS)
    assert a["pruned_fraction"].tolist() == b["pruned_fraction"].tolist()
    assert b["bmr_seconds"].notna().tolist() == [True, True, False]
    assert_same_metrics(a, b)  # the old last epoch's row is evaluated after its pass, as in the straight run
    with pytest.raises(PyrozooError, match="would shorten it"):
        Run.open(tmp_path / "short", epochs=2, log=quiet)
    passes = pd.read_csv(tmp_path / "short" / "bmr.csv")  # one row per pass and prunable layer
    pd.testing.assert_frame_equal(passes, pd.read_csv(tmp_path / "straight" / "bmr.csv"))
    assert passes["epoch"].tolist() == [1, 2] and (passes["kept"] <= passes["live_before"]).all()
    assert json.loads((tmp_path / "short" / CONFIG).read_text())["config"]["epochs"] == 3


def test_open_resumes_with_the_saved_config(tmp_path):
    train(tiny(epochs=1, steps_per_epoch=3), tmp_path)
    run = Run.open(tmp_path, epochs=2, log=quiet)
    assert (run.epoch, run.step) == (1, 3)
    c = run.config
    assert (c.epochs, c.steps_per_epoch, c.seed, c.samples) == (2, 3, 0, 2)
    assert tuple(run.config.net_options["hidden"]) == (32,)
    assert Run.open(tmp_path, log=quiet).config.epochs == 1  # without epochs: the run's own
    with pytest.raises(PyrozooError):
        Run.open(tmp_path / "nothing-here", log=quiet)


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    config = tiny(epochs=1, steps_per_epoch=5)
    a, b = train(config, tmp_path / "a"), train(config, tmp_path / "b")
    assert_same_tensors(guide_params(a), guide_params(b))
    assert_same_metrics(a.metrics(), b.metrics())

    c = train(dataclasses.replace(config, seed=1), tmp_path / "c")
    pa, pc = guide_params(a), guide_params(c)
    assert pa.keys() == pc.keys()
    assert not any(torch.equal(pa[k], pc[k]) for k in pa)
    assert a.metrics()["elbo"][0] != c.metrics()["elbo"][0]


# --- the run folder's files ---------------------------------------------------------------------------------


def test_metrics_and_config_files(tmp_path):
    run = Run(tiny(epochs=3, steps_per_epoch=4, eval_every=2), tmp_path, log=quiet)
    table = run.train(progress=False)

    metrics = pd.read_csv(tmp_path / METRICS)
    assert set(DOCUMENTED_COLUMNS) <= set(metrics.columns)
    assert list(metrics["epoch"]) == [1, 2, 3] and list(metrics["step"]) == [4, 8, 12]
    assert metrics["seconds"].is_monotonic_increasing and (metrics["seconds"] > 0).all()
    assert metrics["elbo"].map(math.isfinite).all()
    # eval_every=2 with 3 epochs: epoch 2 (a multiple) and epoch 3 (the last), not epoch 1.
    assert metrics.loc[0, EVAL_COLUMNS + ["eval_seconds"]].isna().all()
    evaluated = metrics.loc[1:, EVAL_COLUMNS]
    assert evaluated.notna().all().all() and evaluated.map(math.isfinite).all().all()
    assert metrics.loc[1:, "accuracy"].between(0, 1).all()
    assert_same_metrics(table, metrics)

    saved = json.loads((tmp_path / CONFIG).read_text())
    assert saved["config"] == json.loads(json.dumps(dataclasses.asdict(run.config)))
    # Defaults resolved from the method: meanfield guide and lr 1e-3 in weight units for flat-ff; explicit
    # samples kept.
    c = saved["config"]
    assert (c["guide"], c["lr"], c["lr_units"], c["samples"]) == ("meanfield", 1e-3, "weight", 2)
    assert saved["config"]["data"] == "fashion-mnist-mini" and saved["data_source"] == "bundled"
    assert saved["versions"]["torch"] == torch.__version__
    assert torch.load(tmp_path / CHECKPOINT, weights_only=False)["epoch"] == 3
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / ".write-test").exists()


# --- errors -------------------------------------------------------------------------------------------------


def test_existing_run_needs_resume_and_is_left_alone(tmp_path):
    train(tiny(epochs=1, steps_per_epoch=2, samples=1), tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (CONFIG, METRICS, CHECKPOINT)}
    with pytest.raises(PyrozooError, match="--resume"):
        Run(tiny(epochs=1, steps_per_epoch=2, samples=1), tmp_path, log=quiet)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("folder", ["empty", "missing"])
def test_resume_needs_a_checkpoint(tmp_path, folder):
    out = tmp_path / folder
    if folder == "empty":
        out.mkdir()
    with pytest.raises(PyrozooError, match="nothing to resume"):
        Run(tiny(), out, resume=True, log=quiet)


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_unwritable_run_folder(tmp_path, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file")
    out = blocker / "run" if where == "under-a-file" else blocker
    with pytest.raises(PyrozooError, match="cannot write to the run folder"):
        Run(tiny(), out, log=quiet)
    assert blocker.read_text() == "a regular file"


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("seed", -1, "seed"),
        ("seed", 2**32, "seed"),
        ("device", "gpu0", "device"),
        ("epochs", 0, "epochs"),
        ("steps_per_epoch", 0, "steps-per-epoch"),
        ("batch_size", -3, "batch-size"),
        ("eval_every", 0, "eval-every"),
        ("samples", 0, "samples"),
        ("lr", -1.0, "lr"),
        ("lr", float("nan"), "lr"),
        ("net", "resnet-9000", "net"),
        ("method", "magic", "method"),
        ("data", "imagenet", "dataset"),
        ("guide", "flow", "guide"),
        ("optimizer", "sgd", "optimizer.*adabelief"),
    ],
)
def test_bad_config_is_a_pyrozoo_error(tmp_path, field, value, words):
    with pytest.raises(PyrozooError, match=words):
        Run(tiny(**{field: value}), tmp_path / "out", log=quiet)
    assert not (tmp_path / "out" / CHECKPOINT).exists()


# --- stochastic BMR ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["bmr-ss", "bmr-th", "bmr-lss"])
def test_each_bmr_pass_applies_the_methods_rule_to_the_current_posterior(tmp_path, monkeypatch, method):
    from pyrozoo.bmr.scores import delta_f
    from pyrozoo.methods import METHODS

    passes = []

    class Spy:
        def __init__(self, reduction):
            self.reduction = reduction

        def __call__(self, model, guide):
            gains = delta_f(model, guide)
            live = {name: model.mask(name).bool().clone() for name in gains}
            report = self.reduction(model, guide)
            keep = {name: model.mask(name).bool().clone() for name in gains}
            passes.append((self.reduction.describe(), gains, live, keep, report))
            return report

    run = Run(tiny(method=method, epochs=3, warmup_steps=6), tmp_path, log=quiet)
    run.reduction = Spy(run.reduction)
    # So few steps barely move the posterior from its initialisation: centre half of the first layer's weights
    # at 0 (scale 0.1, so dF = ln 10 > 0) to give every rule something to prune.
    site = run.model.layers[0].site
    loc, scale = run.guide.posterior()[site]
    loc = loc.clone()
    loc[:, ::2] = 0.0
    run.guide.write_posterior(site, loc, scale)
    run.train(progress=False)
    rule = METHODS[method].reduction.describe()
    assert [used for used, *_ in passes] == [rule, rule]  # after every epoch but the last
    cutoffs = []
    for _, gains, live, keep, report in passes:
        for layer in report.layers:
            cutoffs.append(layer.cutoff)
            assert torch.equal(keep[layer.layer], live[layer.layer] & (gains[layer.layer] <= layer.cutoff))
    _, _, _, last_keep, _ = passes[-1]
    assert sum(int((~k).sum()) for k in last_keep.values()) > 0
    assert (cutoffs == [0.0] * len(cutoffs)) == (method == "bmr-th")
    assert max(cutoffs) > 0 if method == "bmr-ss" else max(cutoffs) <= 0


# --- guides -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("guide", ["meanfield", "autonormal", "autodelta"])
def test_every_guide_learns(tmp_path, guide):
    # 30 steps of batch 120 at flat-ff's lr (1e-3 in weight units) reach 0.48-0.65 test accuracy for seeds 0
    # and 1 (chance 0.1; the earlier default, 5e-3 in z units, 0.43-0.57).
    run = Run(tiny(guide=guide, epochs=1, steps_per_epoch=30, batch_size=120, samples=4), tmp_path, log=quiet)
    assert run.config.guide == guide
    before = run.evaluate()["accuracy"]
    after = run.train(progress=False)["accuracy"].iloc[-1]
    assert after > 0.3 and after > before + 0.1, (before, after)


# --- minibatches --------------------------------------------------------------------------------------------


def passes(batches: Minibatches, n_passes: int, per_pass: int) -> list[torch.Tensor]:
    return [torch.cat([batches.next() for _ in range(per_pass)]) for _ in range(n_passes)]


def test_minibatches_never_repeat_an_index_within_a_pass():
    batches = Minibatches(10, 3, seed=0)
    seen = torch.zeros(10, dtype=torch.long)
    drawn = passes(batches, 20, 3)  # 10 // 3 = 3 batches a pass; the 10th index sits the pass out
    for indices in drawn:
        assert indices.shape == (9,) and indices.dtype == torch.int64
        assert len(set(indices.tolist())) == 9 and 0 <= indices.min() and indices.max() < 10
        seen[indices] += 1
    assert (seen > 0).all()  # the index left out changes from pass to pass
    assert len({tuple(p.tolist()) for p in drawn}) > 1  # reshuffled between passes


@pytest.mark.parametrize("size, batch_size", [(12, 3), (12, 12), (5, 8)])
def test_minibatches_cover_every_index_once_per_pass(size, batch_size):
    batches = Minibatches(size, batch_size, seed=3)
    per_pass = size // min(batch_size, size)
    for indices in passes(batches, 4, per_pass):
        assert sorted(indices.tolist()) == list(range(size))


def test_minibatches_state_dict_reproduces_the_sequence():
    batches = Minibatches(10, 3, seed=0)
    for _ in range(4):  # mid-way through the second pass
        batches.next()
    buffer = io.BytesIO()
    torch.save(batches.state_dict(), buffer)  # as in a checkpoint
    expected = [batches.next() for _ in range(10)]  # crosses three reshuffles

    restored = Minibatches(10, 3, seed=12345)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    assert all(torch.equal(a, b) for a, b in zip(expected, [restored.next() for _ in range(10)]))
    fresh = Minibatches(10, 3, seed=12345)
    assert not all(torch.equal(a, b) for a, b in zip(expected, [fresh.next() for _ in range(10)]))


def test_evaluation_never_changes_training(tmp_path):
    """Posterior draws for test metrics use their own random stream: evaluating every epoch or only at the end
    (or extending a finished run) leaves the trained guide bit for bit the same."""
    every = train(tiny(epochs=3, eval_every=1), tmp_path / "every")
    last = train(tiny(epochs=3, eval_every=3), tmp_path / "last")
    assert_same_tensors(guide_params(every), guide_params(last))
    assert every.metrics()["accuracy"].iloc[-1] == last.metrics()["accuracy"].iloc[-1]
    train(tiny(epochs=2), tmp_path / "extended")
    extended = Run.open(tmp_path / "extended", epochs=3, log=quiet)
    extended.train(progress=False)
    assert_same_tensors(guide_params(extended), guide_params(every))


@pytest.mark.parametrize("env, checked", [(None, False), ("1", True)])
def test_training_checks_distribution_arguments_only_when_asked(tmp_path, monkeypatch, env, checked):
    """Training steps, and svi_step called on its own, run without Pyro's argument checks (on in the tests, as
    in Pyro by default), unless $PYROZOO_VALIDATE is 1 (a debugging aid) or the call asks for them."""
    from pyro.infer.util import is_validation_enabled

    from pyrozoo.guides import make_guide
    from pyrozoo.models import BayesianModel
    from pyrozoo.nets import create_net

    seen = []

    def recording_elbo(*args):
        seen.append(is_validation_enabled())
        return negative_elbo(*args)

    if env is None:
        monkeypatch.delenv(VALIDATE_ENV, raising=False)
    else:
        monkeypatch.setenv(VALIDATE_ENV, env)
    with Run(tiny(epochs=1, steps_per_epoch=2), tmp_path / "run", log=quiet) as run:
        with_loss(run, recording_elbo)
        run.train(progress=False)
    assert seen == [checked, checked]
    model = BayesianModel(create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(5,)))
    guide = make_guide("meanfield", model)
    optimizer = torch.optim.Adam(guide.parameters())
    x, y = torch.randn(6, 1, 4, 4), torch.randint(0, 3, (6,))
    for validate in (None, True, False):
        seen.clear()
        svi_step(model, guide, optimizer, x, y, 60, validate=validate, loss=recording_elbo)
        assert seen == [checked if validate is None else validate]
    assert is_validation_enabled()  # the tests' setting, which the step changed only while it ran
