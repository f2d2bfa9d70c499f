"""Gaussian regression, per-input predictions and measured uncertainty (issue 18)."""

import dataclasses
import math

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from configs import tiny_config
from pyro import poutine
from pyro.infer import Predictive

from pyrozoo import data as datasets
from pyrozoo.config import TrainConfig
from pyrozoo.elbo import negative_elbo
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import GUIDES, make_guide
from pyrozoo.methods import METHODS
from pyrozoo.metrics import auroc, mixture_quantile, regression_metrics
from pyrozoo.models import BayesianModel
from pyrozoo.models.likelihoods import Gaussian
from pyrozoo.models.priors import PRIORS, gaussian
from pyrozoo.nets import create_net
from pyrozoo.predict import regression_draws
from pyrozoo.shift import NOISE_STD, SHIFTS
from pyrozoo.train import Run
from tests.clitools import assert_one_line_error, cli


def quiet(*_):
    pass


def regression_model(noise="prior", precision=1.0, hidden=(6,), inputs=2, prior=None):
    net = create_net("mlp", in_channels=inputs, image_size=1, num_classes=1, hidden=hidden)
    kwargs = {} if prior is None else {"prior": prior}
    return BayesianModel(net, likelihood=Gaussian(noise, precision), **kwargs)


def test_gaussian_log_density_and_noise_prior_match_torch():
    model = regression_model()
    x, y = torch.randn(7, 2, 1, 1), torch.randn(7)
    trace = poutine.trace(model).get_trace(x, y, dataset_size=70)
    tau = trace.nodes["noise.precision"]["value"]
    mean = model.logits(
        x, model.weights_from({k: v["value"] for k, v in trace.nodes.items() if v["type"] == "sample"})
    )[:, 0]
    site = trace.nodes["y"]
    got = (site["fn"].log_prob(y) * site["scale"]).sum()
    want = torch.distributions.Normal(mean, tau.rsqrt()).log_prob(y).sum() * 70 / 7
    torch.testing.assert_close(got, want)
    prior = trace.nodes["noise.precision"]["fn"]
    values = torch.tensor([0.1, 1.0, 3.0])
    torch.testing.assert_close(
        prior.log_prob(values), torch.distributions.Gamma(2.0, rate=2.0).log_prob(values)
    )


@pytest.mark.parametrize("guide", list(GUIDES))
def test_every_guide_covers_the_noise_latent(guide):
    # a guide of weight latents only (IVON) refuses to learn the noise, saying why
    if GUIDES[guide].fixed_prior:
        for noise in ("prior", "learned"):
            with pytest.raises(PyrozooError, match="IVON cannot learn the noise: .* --noise fixed"):
                make_guide(guide, regression_model(noise, prior=gaussian))
        assert "noise.precision" not in make_guide(guide, regression_model("fixed", prior=gaussian)).sites()
        return
    model = regression_model()
    posterior = make_guide(guide, model)
    assert "noise.precision" in posterior.sites()
    value = posterior()["noise.precision"]
    assert value.shape == () and value > 0
    loss = negative_elbo(model, posterior, torch.randn(5, 2, 1, 1), torch.randn(5), 50)
    assert torch.isfinite(loss)
    if guide == "meanfield":  # a log-normal, as for the layer scales: a Normal in log space
        loc, scale = posterior.posterior()["noise.precision"]
        torch.testing.assert_close(posterior.mean()["noise.precision"], torch.exp(loc + scale**2 / 2))


def test_svi_posterior_approaches_the_exact_posterior_of_a_conjugate_linear_gaussian():
    """One linear layer, w ~ N(0, 1) (a prior of constant scale 1), known noise precision: the exact posterior
    is Gaussian, and the mean-field optimum has its mean and the inverse diagonal of its precision."""
    torch.manual_seed(0)
    n, d, tau = 40, 3, 4.0
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(d, 1))
    model = BayesianModel(net, prior=lambda layer: layer.const(1.0), likelihood=Gaussian("fixed", tau))
    x = torch.randn(n, d, 1, 1)
    design = torch.cat([x.flatten(1), torch.ones(n, 1)], 1).double()  # the bias is one more input column
    w_true = torch.tensor([1.0, -0.5, 0.3, 0.2], dtype=torch.float64)
    y = design @ w_true + torch.randn(n, dtype=torch.float64) / math.sqrt(tau)
    precision = torch.eye(d + 1, dtype=torch.float64) + tau * design.T @ design
    mean = torch.linalg.solve(precision, tau * design.T @ y)
    guide = make_guide("meanfield", model, options={"init_radius": 0.5})
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 400, 0.3)
    with pyro.validation_enabled(False):
        for _ in range(1200):
            optimizer.zero_grad()
            negative_elbo(model, guide, x, y.float(), n).backward()
            optimizer.step()
            scheduler.step()
    loc, scale = guide.posterior()["1.weight_base"]
    torch.testing.assert_close(loc.double().flatten(), mean, atol=0.03, rtol=0)
    torch.testing.assert_close(scale.double().flatten(), precision.diagonal().rsqrt(), atol=0, rtol=0.1)
    # and far from the prior it started near: the test can fail
    assert (loc.double().flatten() - mean).abs().max() < 0.5 * mean.abs().max()


def test_interval_coverage_on_data_drawn_from_the_model_is_nominal():
    torch.manual_seed(1)
    model = regression_model(hidden=(5,), inputs=1)
    guide = make_guide("meanfield", model, options={"init_scale": 0.3})
    n = 500
    x = torch.linspace(-2, 2, n).reshape(n, 1, 1, 1)
    # y_n from a draw of its own, independent of the draws that make the intervals (Predictive, in parallel)
    y = Predictive(model, guide=guide, num_samples=n, parallel=True, return_sites=["y"])(x)["y"]
    y = y.reshape(n, n).diagonal()
    locs, noise = regression_draws(model, guide, x, samples=300)
    metrics = regression_metrics(locs, noise, y, y_mean=3.0, y_std=2.0)
    for level in (50, 90, 95):
        assert abs(metrics[f"coverage{level}"] - level / 100) < 0.05, metrics


def test_mixture_quantile_is_the_normal_quantile_for_one_component_and_solves_the_cdf():
    loc, scale = torch.tensor([[0.5, -1.0]]), torch.tensor([[2.0, 0.1]])
    for q in (0.025, 0.5, 0.9):
        want = torch.distributions.Normal(loc[0].double(), scale[0].double()).icdf(torch.tensor(q).double())
        torch.testing.assert_close(mixture_quantile(loc, scale, q), want)
    locs, scales = torch.randn(30, 4), torch.rand(30, 4) + 0.1
    value = mixture_quantile(locs, scales, 0.9)
    cdf = torch.distributions.Normal(locs.double(), scales.double()).cdf(value).mean(0)
    torch.testing.assert_close(cdf, torch.full_like(cdf, 0.9))


def test_regression_metrics_are_in_the_original_units():
    locs, noise, y = torch.randn(10, 50), torch.rand(10, 50) + 0.5, torch.randn(50)
    base = regression_metrics(locs, noise, y)
    scaled = regression_metrics(locs, noise, y, y_mean=7.0, y_std=3.0)
    assert scaled["rmse"] == pytest.approx(3 * base["rmse"])
    assert scaled["nll"] == pytest.approx(base["nll"] + math.log(3))
    assert scaled["coverage90"] == base["coverage90"]


def test_auroc_counts_pairs_with_ties_as_half():
    g = torch.Generator().manual_seed(0)
    scores, positive = torch.randint(0, 5, (60,), generator=g).double(), torch.rand(60, generator=g) < 0.4
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
    assert auroc(scores, positive) == pytest.approx(pairs.mean().item())
    assert math.isnan(auroc(scores, torch.zeros(60, dtype=torch.bool)))


@pytest.mark.parametrize("parallel", [False, True])
def test_predictive_returns_the_model_output(parallel):
    model = regression_model(noise="fixed", precision=1e10)
    guide = make_guide("autodelta", model)
    x = torch.randn(5, 2, 1, 1)
    y = Predictive(model, guide=guide, num_samples=3, parallel=parallel, return_sites=["y"])(x)["y"]
    f = model.logits(x, model.weights_from(guide.median()))[:, 0]
    torch.testing.assert_close(y.reshape(3, 5), f.expand(3, 5), atol=1e-3, rtol=0)


def test_predictive_in_parallel_for_classification(tiny_mlp_model, tiny_batch):
    guide = make_guide("meanfield", tiny_mlp_model)
    out = Predictive(tiny_mlp_model, guide=guide, num_samples=4, parallel=True)(tiny_batch[0])
    assert out["y"].shape[0] == 4 and out["y"].shape[-1] == 6


@pytest.mark.parametrize("prior", [*PRIORS, "tiered-local"])
def test_predictive_in_parallel_with_every_prior(prior):
    """Every prior (the tiered one's per-row and per-weight scales included) under Pyro's vectorised plate:
    Predictive(parallel=True) returns every site in the shapes of parallel=False, and each stacked draw's y has
    the distribution the model gives that draw's latents one at a time (its logits, compared exactly)."""
    from functools import partial

    fn = partial(PRIORS["tiered"], local=True) if prior == "tiered-local" else PRIORS[prior]
    net = create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(5, 4))
    model = BayesianModel(net, prior=fn)
    guide = make_guide("meanfield", model, options={"init_scale": 0.5})
    x, draws = torch.randn(6, 1, 4, 4), 4
    pyro.set_rng_seed(0)
    sequential = Predictive(model, guide=guide, num_samples=draws, parallel=False)(x)
    parallel = Predictive(model, guide=guide, num_samples=draws, parallel=True)(x)
    assert {k: v.shape for k, v in parallel.items()} == {k: v.shape for k, v in sequential.items()}
    # the trace Predictive(parallel=True) runs: the model in a vectorised plate, at the guide's stacked draws
    trace = Predictive(model, guide=guide, num_samples=draws, parallel=True).get_vectorized_trace(x)
    logits = trace.nodes["y"]["fn"].logits
    assert logits.numel() == draws * 6 * 3
    latents = {k: trace.nodes[k]["value"] for k in parallel if k != "y"}
    assert "head.weight_base" in latents and (prior != "tiered" or "body.1.rows" in latents)
    for s in range(draws):
        one = {k: v[s].reshape(trace.nodes[k]["fn"].event_shape) for k, v in latents.items()}
        want = torch.log_softmax(model.logits(x, model.weights_from(one)), -1)
        got = torch.log_softmax(logits.reshape(draws, 6, 3)[s], -1)
        torch.testing.assert_close(got, want)


def tiny_regression(method="flat-ff", **changes):
    options = dict(data="toy1d", steps_per_epoch=3, batch_size=50, samples=3, warmup_steps=3)
    return tiny_config(method=method, **{**options, "net_options": {"hidden": (8,)}, **changes})


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_regression(tmp_path, method):
    covers_weights_only = GUIDES[METHODS[method].guide].fixed_prior  # IVON: the noise is a constant
    run = Run(
        tiny_regression(method, **({"noise": "fixed"} if covers_weights_only else {})), tmp_path, log=quiet
    )
    table = run.train(progress=False)
    last = table.iloc[-1]
    for key in ("rmse", "nll", "coverage50", "coverage90", "coverage95", "pruned_fraction"):
        assert np.isfinite(last[key]), (key, last)
    if METHODS[method].reduction is not None:
        assert table["bmr_seconds"].notna().any()


@pytest.mark.parametrize("method", ["flat-map", "flat-ff"])
def test_a_deterministic_net_holds_the_noise_at_its_posterior_mean(tmp_path, method):
    """A rebuilt or Laplace net has no noise latent: the run's noise precision is held at its posterior mean
    (a log-normal's mean under mean-field, the point under MAP); the Laplace model keeps that constant with
    ``noise="run"``, and by default the one the Laplace evidence chooses from the training targets."""
    from pyrozoo.posteriors.laplace import laplace_from_run

    run = Run(tiny_regression(method), tmp_path, log=quiet)
    run.train(progress=False)
    loc, scale = run.guide.site_posterior("noise.precision")
    want = math.exp(float(loc) + float(scale) ** 2 / 2)  # the log-normal's mean (scale 0: MAP's point)
    point = run.model.likelihood.at_point(run.guide)
    assert point.noise == "fixed" and point.precision().item() == pytest.approx(want, rel=1e-6)
    model, _ = laplace_from_run(run, "diag", progress=False, noise="run")
    assert model.likelihood.noise == "fixed"
    assert model.likelihood.precision().item() == pytest.approx(want, rel=1e-6)
    chosen, _ = laplace_from_run(run, "diag", progress=False)
    assert chosen.likelihood.noise == "fixed" and chosen.likelihood.precision().item() != pytest.approx(want)
    with pytest.raises(PyrozooError, match="noise precision is a latent"):
        run.model.likelihood.at_point(None)


def test_laplace_prune_sweep_and_export_of_a_regression_run(tmp_path, capsys):
    """Every posterior source works on regression: a flat-map run pruned from a KFAC Laplace posterior, its
    metrics in the targets' units (before pruning: the run's own evaluation of its MAP net), then swept with a
    fine-tune, and exported."""
    run = Run(tiny_regression("flat-map"), tmp_path, log=quiet)
    table = run.train(progress=False)
    code, out, err = cli(capsys, "prune", str(tmp_path), "--posterior", "laplace-kfac", "--sparsity", "0.5")
    assert code == 0, err
    state = torch.load(tmp_path / "pruned-laplace-kfac.pt", weights_only=False)
    assert {"rmse", "nll", "coverage90"} <= set(state["metrics"]) and "accuracy" not in state["metrics"]
    before = next(line for line in out.splitlines() if line.startswith("before"))
    assert f"{table.rmse.iloc[-1]:.4f}" in before  # the MAP net as the run evaluated it
    assert state["metrics"]["rmse"] != pytest.approx(table.rmse.iloc[-1])  # half its weights are gone
    code, out, err = cli(
        capsys,
        "sweep",
        str(tmp_path),
        "--sparsities",
        "0.5",
        "--methods",
        "bmr-laplace-diag",
        "magnitude",
        "--finetune-steps",
        "3",
        "--no-progress",
    )
    assert code == 0, err
    sweep = pd.read_csv(tmp_path / "sweep" / "sweep.csv")
    assert sweep.rmse.notna().all() and "accuracy" not in sweep
    tuned = sweep[sweep.finetune_steps == 3].set_index("method").rmse
    untuned = sweep[(sweep.finetune_steps == 0) & (sweep.method != "dense")].set_index("method").rmse
    assert (tuned != untuned).all()  # the fine-tune ran on the Gaussian likelihood
    assert "RMSE is 1% above" in out
    code, out, err = cli(capsys, "export", str(tmp_path), "--pruned", "laplace-kfac")
    assert code == 0, err
    summary = pd.read_json(tmp_path / "export" / "summary.json", typ="series")
    assert summary["units_cut"]["rmse"] == pytest.approx(state["metrics"]["rmse"], rel=1e-6)
    preds = tmp_path / "preds.csv"
    code, out, err = cli(capsys, "predict", str(tmp_path), "--pruned", "laplace-kfac", "--out", str(preds))
    assert code == 0, err
    frame = pd.read_csv(preds)
    assert math.sqrt((frame.error**2).mean()) == pytest.approx(state["metrics"]["rmse"], rel=1e-5)
    hit = (frame.target >= frame.lower90) & (frame.target <= frame.upper90)
    assert hit.mean() == pytest.approx(state["metrics"]["coverage90"])  # the run's noise, as prune scored it
    assert "the pruned plain net" in err


def test_laplace_of_a_one_output_net_as_a_classifier_says_how_to_make_it_a_regressor():
    from pyrozoo.posteriors.laplace import laplace

    net = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    with pytest.raises(PyrozooError, match="likelihood=Gaussian"):
        laplace(net, torch.randn(20, 3), progress=False)
    model, _ = laplace(net, torch.randn(20, 3), likelihood=Gaussian("fixed", 4.0), progress=False)
    assert all(r["prior_precision"] > 1e-6 for r in model.laplace)


@pytest.mark.parametrize("noise", ["fixed", "learned"])
def test_fixed_and_learned_noise(tmp_path, noise):
    run = Run(tiny_regression(noise=noise, noise_precision=2.0), tmp_path, log=quiet)
    assert "noise.precision" not in run.guide.sites()
    run.train(progress=False)
    precision = run.model.likelihood.precision()
    if noise == "fixed":
        assert precision.item() == 2.0
    else:
        assert precision.item() != pytest.approx(2.0, abs=1e-6)  # SVI moved the point estimate
        reopened = Run.open(tmp_path, log=quiet)
        torch.testing.assert_close(reopened.model.likelihood.precision(), precision)


def test_targets_are_standardised_with_training_statistics():
    raw = datasets.load("toy1d")
    prepared = datasets.prepare(raw)
    assert prepared.task == "regress"
    assert (
        prepared.y_train.double().mean().abs() < 1e-5
        and (prepared.y_train.double().std(unbiased=False) - 1).abs() < 1e-5
    )
    torch.testing.assert_close(
        prepared.y_mean + prepared.y_std * prepared.y_test.double(), raw.y_test.double()
    )


def write_table(path, n=60, classify=False):
    g = np.random.default_rng(0)
    a, b = g.normal(size=n), g.normal(size=n)
    target = np.where(a + b > 0, "yes", "no") if classify else 3 * a - b + 100
    pd.DataFrame({"a": a, "b": b, "target": target}).to_csv(path, index=False)


@pytest.mark.parametrize("task", ["regress", "classify"])
def test_a_users_csv_table(tmp_path, task):
    path = tmp_path / "table.csv"
    write_table(path, classify=task == "classify")
    raw = datasets.load(str(path), target="target", task=task)
    assert raw.x_train.shape == (48, 2, 1, 1) and raw.x_test.shape == (12, 2, 1, 1)
    assert raw.task == task and raw.num_classes == (2 if task == "classify" else 1)
    config = TrainConfig(
        net="mlp",
        data=str(path),
        target="target",
        task=task,
        method="flat-ff",
        epochs=1,
        steps_per_epoch=2,
        batch_size=16,
        samples=2,
        net_options={"hidden": (4,)},
    )
    run = Run(config, tmp_path / "run", log=quiet)
    row = run.train(progress=False).iloc[-1]
    assert np.isfinite(row["rmse" if task == "regress" else "accuracy"])


def test_table_mistakes_are_one_line_errors(tmp_path, capsys):
    path = tmp_path / "table.csv"
    write_table(path)
    base = [
        "train",
        "--net",
        "mlp",
        "--data",
        str(path),
        "--epochs",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path / "r"),
    ]
    assert_one_line_error(*cli(capsys, *base), "--target")
    assert_one_line_error(*cli(capsys, *base, "--target", "nope"), "no column 'nope'", "a, b, target")
    write_table(path, classify=True)
    assert_one_line_error(*cli(capsys, *base, "--target", "target"), "not numeric", "--task classify")


def test_predict_command_writes_per_input_rows(tmp_path, capsys):
    run = Run(tiny_regression(), tmp_path / "run", log=quiet)
    run.train(progress=False)
    run.close()
    out = tmp_path / "preds.csv"
    code, _, err = cli(
        capsys, "predict", str(tmp_path / "run"), "--out", str(out), "--no-progress", "--batch-size", "7"
    )
    assert code == 0, err
    frame = pd.read_csv(out)
    assert len(frame) == 600
    assert {"target", "mean", "std", "aleatoric_std", "epistemic_std", "lower95", "upper95"} <= set(frame)
    inputs = tmp_path / "x.csv"
    pd.DataFrame({"x": [-3.0, 0.0, 3.0]}).to_csv(inputs, index=False)
    code, _, err = cli(
        capsys, "predict", str(tmp_path / "run"), "--input", str(inputs), "--out", str(out), "--no-progress"
    )
    assert code == 0, err
    assert len(pd.read_csv(out)) == 3 and "target" not in pd.read_csv(out)


def test_shifts():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 1, 28, 28), generator=g, dtype=torch.uint8)
    # a quarter turn maps pixel centres onto pixel centres: bilinear sampling is then exact
    torch.testing.assert_close(SHIFTS["rotate"](images, 5), torch.rot90(images, 1, dims=(2, 3)))
    grey = torch.full((200, 1, 28, 28), 128, dtype=torch.uint8)
    for severity in (1, 3):
        noisy = SHIFTS["noise"](grey, severity).float() / 255
        assert (noisy - 128 / 255).std().item() == pytest.approx(NOISE_STD[severity - 1], rel=0.05)
    with pytest.raises(PyrozooError, match="severity"):
        SHIFTS["noise"](grey, 6)


def test_uncertainty_command_and_its_compare_columns(tmp_path, capsys):
    from pyrozoo.compare import uncertainty_summary

    config = TrainConfig(
        net="mlp", data="fashion-mnist-mini", method="flat-ff", epochs=1, steps_per_epoch=2, batch_size=32,
        samples=2, net_options={"hidden": (8,)},
    )  # fmt: skip
    Run(config, tmp_path, log=quiet).train(progress=False)
    code, out, err = cli(capsys, "uncertainty", str(tmp_path), "--no-progress", "--samples", "2")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "uncertainty.csv")
    assert list(table["shift"]) == ["none"] + ["rotate"] * 5 + ["noise"] * 5
    assert table[["accuracy", "ece", "nll", "entropy_auroc", "mi_auroc"]].notna().all().all()
    assert ((table["entropy_auroc"] >= 0) & (table["entropy_auroc"] <= 1)).all()
    summary = uncertainty_summary(tmp_path / "uncertainty.csv")
    assert summary["entropy_auroc"] == table["entropy_auroc"][0]
    assert summary["shift_accuracy"] == pytest.approx(table["accuracy"][1:].mean())
    code, out, err = cli(capsys, "uncertainty", str(tmp_path / "nope"))
    assert_one_line_error(code, out, err, "nope")


def csv_run(tmp_path, task):
    path = tmp_path / "table.csv"
    write_table(path, classify=task == "classify")
    config = TrainConfig(
        net="mlp", data=str(path), target="target", task=task, method="flat-ff", epochs=1, steps_per_epoch=3,
        batch_size=16, samples=4, net_options={"hidden": (4,)},
    )  # fmt: skip
    Run(config, tmp_path / "run", log=quiet).train(progress=False)
    return path, tmp_path / "run"


@pytest.mark.parametrize("task", ["regress", "classify"])
def test_predict_input_csv_with_the_target_column_scores_each_row(tmp_path, capsys, task):
    """A --input CSV holding the run's target column: the column is not an input, it is said so on stderr, and
    each row is scored against it; the columns are read by name (any order), labels mapped to the run's
    classes; the same rows give the same predictions as the run's own test split."""
    table, run = csv_run(tmp_path, task)
    rows = pd.read_csv(table).iloc[::-1]  # reversed rows, shuffled columns
    rows = rows[["target", "b", "a"]]
    inputs, out, ref = tmp_path / "in.csv", tmp_path / "out.csv", tmp_path / "ref.csv"
    rows.to_csv(inputs, index=False)
    code, stdout, err = cli(
        capsys, "predict", str(run), "--input", str(inputs), "--out", str(out), "--no-progress"
    )
    assert code == 0, err
    assert "'target' is the run's target" in err and "scored" in err
    frame = pd.read_csv(out)
    assert len(frame) == 60 and "nll" in frame and "target" in frame
    if task == "regress":
        np.testing.assert_allclose(frame["target"], rows["target"], rtol=1e-6)
        np.testing.assert_allclose(frame["error"], frame["mean"] - frame["target"], rtol=1e-5, atol=1e-5)
        assert stdout.startswith("rmse ") and "coverage90" in stdout
    else:
        assert list(frame["target"]) == [int(v == "yes") for v in rows["target"]]  # classes sorted: no, yes
        probs = frame[["prob0", "prob1"]].to_numpy()
        picked = probs[np.arange(60), frame["target"].to_numpy()]
        np.testing.assert_allclose(frame["nll"], -np.log(picked), rtol=1e-6)
        assert stdout.startswith("accuracy ")
    # the run's own test split: the same inputs give the same predictions (same seeded draws)
    code, _, err = cli(capsys, "predict", str(run), "--out", str(ref), "--no-progress")
    assert code == 0, err
    reference = pd.read_csv(ref)
    _, test = datasets._split(60)  # the run's test rows, in order
    merged = frame.set_index(rows.index).loc[test.numpy()]
    column = "mean" if task == "regress" else "prob1"
    np.testing.assert_allclose(merged[column], reference[column], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(merged["nll"], reference["nll"], rtol=1e-5, atol=1e-6)
    # without the target column: predictions only, and stderr says the rows are not scored
    rows.drop(columns=["target"]).to_csv(inputs, index=False)
    code, _, err = cli(
        capsys, "predict", str(run), "--input", str(inputs), "--out", str(out), "--no-progress"
    )
    assert code == 0 and "not scored" in err
    assert not {"target", "nll", "error", "correct"} & set(pd.read_csv(out))


def test_predict_input_csv_mistakes_are_one_line_errors(tmp_path, capsys):
    table, run = csv_run(tmp_path, "classify")
    rows, inputs = pd.read_csv(table), tmp_path / "in.csv"
    base = ["predict", str(run), "--input", str(inputs), "--out", str(tmp_path / "o.csv"), "--no-progress"]
    rows.assign(target="maybe").to_csv(inputs, index=False)
    assert_one_line_error(*cli(capsys, *base), "maybe", "no, yes")
    rows.rename(columns={"b": "c"}).to_csv(inputs, index=False)
    assert_one_line_error(*cli(capsys, *base), "missing: b", "not features of the run: c")


def test_predict_data_csv_reads_columns_by_name_and_labels_as_the_runs_classes(tmp_path, capsys):
    """--data OTHER.csv: its columns in another order, its labels a subset in another order of codes; the rows
    are the same as the run's table, so the predictions and scored classes must be the run's own."""
    table, run = csv_run(tmp_path, "classify")
    rows = pd.read_csv(table)
    other, out, ref = tmp_path / "other.csv", tmp_path / "o.csv", tmp_path / "ref.csv"
    rows[["b", "target", "a"]].to_csv(other, index=False)
    assert cli(capsys, "predict", str(run), "--out", str(ref), "--no-progress")[0] == 0
    code, _, err = cli(capsys, "predict", str(run), "--data", str(other), "--out", str(out), "--no-progress")
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.read_csv(out), pd.read_csv(ref))
    # labels of another table: their codes there are not the run's
    from pyrozoo.data import RawData
    from pyrozoo.predict import align_table

    x = torch.arange(6.0).reshape(2, 3, 1, 1)
    like = RawData("t", x, None, x, None, 3, "t.csv", "classify", ("a", "b", "c"), ("no", "maybe", "yes"))
    theirs = RawData(
        "o",
        x,
        None,
        x.flip(1),
        torch.tensor([0, 1]),
        2,
        "o.csv",
        "classify",
        ("c", "b", "a"),
        ("maybe", "yes"),
    )
    x2, y2 = align_table(theirs, like)
    assert torch.equal(x2, x) and y2.tolist() == [1, 2]
    with pytest.raises(PyrozooError, match="not trained on: never"):
        align_table(dataclasses.replace(theirs, class_labels=("never", "yes")), like)


@pytest.mark.parametrize("rmse, warned", [(None, True), (0.1, False)])
def test_training_warns_when_the_net_learned_a_constant(capsys, rmse, warned):
    """A regression net whose last evaluation beats neither the target mean's RMSE nor its NLL gets one line
    on stderr saying so and what to try; a net that beats them gets none."""
    from types import SimpleNamespace

    from pyrozoo.cli import _warn_if_input_free
    from pyrozoo.metrics import input_free_scores

    d = datasets.prepare(datasets.load("toy1d"))
    constant = input_free_scores(d)
    last = pd.Series({"rmse": constant["rmse"] if rmse is None else rmse, "nll": constant["nll"]})
    _warn_if_input_free(SimpleNamespace(data=d), last)
    err = capsys.readouterr().err
    assert ("learned a constant" in err and "--start net" in err) == warned
