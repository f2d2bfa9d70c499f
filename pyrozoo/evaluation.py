"""A run's test metrics: from posterior draws (:func:`evaluate`, :func:`evaluate_setup`), of a deterministic
net made from it (:func:`net_metrics`) or of the predictive of a posterior made from it
(:func:`predictive_metrics`); and the loop's :class:`Evaluate` callback, on the run's schedule."""

from __future__ import annotations

import math
import time

import torch
from pyro import poutine

from pyrozoo import distributed
from pyrozoo.loop import Callback
from pyrozoo.metrics import PredictionAccumulator, evaluate_draws
from pyrozoo.metrics import net_metrics as _net_metrics
from pyrozoo.metrics import points_per_chunk, regression_metrics_in_chunks
from pyrozoo.models import BayesianModel
from pyrozoo.predict import draw_outputs, evaluating, predict_batch, regression_draws, seeded_draws

# What an evaluation writes into a metrics row: classification's, then regression's own columns.
CLASSIFICATION = ("accuracy", "nll", "ece", "ece15", "brier", "lpd")
EVALUATED = (*CLASSIFICATION, "rmse", "coverage50", "coverage90", "coverage95")


@torch.no_grad()
def evaluate(
    model: BayesianModel,
    guide,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    samples: int,
    batch_size: int = 2000,
    samples_at_once: int = 1,
    world: distributed.World = distributed.World(),
) -> dict[str, float]:
    """Predictive metrics of ``samples`` posterior draws from ``guide`` on ``(x, y)``.

    ``samples_at_once`` > 1 runs that many draws through the net together (``torch.func.vmap`` over their
    weights), on ``batch_size // samples_at_once`` points at a time, so that memory stays that of ``batch_size``
    points. The draws are the same, in the same order, so the metrics are the same up to float rounding. On a
    CPU it is slower (the net's matrix products are as large either way, and a convolution over stacked weights
    becomes a grouped one): experiments/RESULTS.md, issue 17. In a data-parallel ``world``, each rank computes
    its part of every batch and all get the metrics of the whole.
    """
    at_once = max(1, min(samples_at_once, samples, batch_size))
    batched_logits = torch.func.vmap(model.logits, in_dims=(None, 0))

    def draws():
        for first in range(0, samples, at_once):
            # one draw after another, as the one-at-a-time loop draws them: the same random numbers
            group = [model.weights_from(guide()) for _ in range(min(at_once, samples - first))]
            if at_once == 1:
                weights = group[0]
                yield world.sharded(lambda xb: model.likelihood.log_probs(model.logits(xb, weights)))
            else:
                stacked = {name: torch.stack([w[name] for w in group]) for name in group[0]}
                yield world.sharded(
                    lambda xb: model.likelihood.log_probs(batched_logits(xb, stacked)), points_dim=1
                )

    with evaluating(model), poutine.block():  # no dropout at test time
        return evaluate_draws(draws(), x, y, num_classes, samples, max(1, batch_size // at_once))


def evaluate_setup(
    setup, epoch: int, samples: int | None = None, on: tuple | None = None
) -> dict[str, float]:
    """Test metrics of a run's ``setup`` after ``epoch`` (or on ``on``, inputs and targets), from ``samples``
    posterior draws (default: the run's). The draws come from a random stream of their own (seeded by the run's
    seed and epoch), so how often a run evaluates never changes how it trains."""
    d, c = setup.data, setup.config
    x, y = on or (d.x_test, d.y_test)
    samples = samples or c.samples
    devices = [d.x_test.device] if d.x_test.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        seed = c.seed * 100_003 + epoch
        torch.manual_seed(seed)
        if d.task == "regress":
            return _regression(setup, seed, samples, x, y)
        return evaluate(
            setup.model, setup.guide, x, y, d.num_classes, samples, c.eval_batch_size, world=setup.world
        )


def _regression(setup, seed: int, samples: int, x_all, y_all) -> dict[str, float]:
    """RMSE, NLL, LPD and interval coverage in the targets' original units (see metrics.regression_metrics).
    The test points go in chunks that hold a bounded number of (draw, point) pairs, each chunk drawing the
    same ``samples`` draws again from ``seed``: more samples take longer, not more memory."""
    chunk = points_per_chunk(samples, len(x_all))

    def chunks():
        for start in range(0, len(x_all), chunk):
            torch.manual_seed(seed)
            x = x_all[start : start + chunk]
            locs, noise_var = regression_draws(
                setup.model, setup.guide, x, samples, setup.config.eval_batch_size
            )
            yield locs, noise_var, y_all[start : start + chunk]

    return regression_metrics_in_chunks(chunks(), setup.data.y_mean, setup.data.y_std)


def point_likelihood(setup):
    """The run's likelihood for a deterministic net made from it (rebuilt, pruned, Laplace): a regression's
    noise held at its posterior mean (``Likelihood.at_point``)."""
    return setup.model.likelihood.at_point(setup.guide)


def net_metrics(setup, net: torch.nn.Module) -> dict[str, float]:
    """The test metrics of a deterministic net made from a run, for its task (see metrics.net_metrics)."""
    return _net_metrics(net, setup.data, point_likelihood(setup), setup.config.eval_batch_size)


@torch.no_grad()
def predictive_metrics(setup, model, guide, samples: int) -> dict[str, float]:
    """The test metrics (:func:`net_metrics`' columns) of the predictive of ``samples`` draws of ``guide``, a
    posterior of ``model`` made from the run (a reduced one, say): a Laplace posterior's by its ``predictive``
    (the linearised net by default), others' by the net at the draws; the draws seeded by the run's seed, as
    ``pyrozoo predict`` draws them, and the same for every batch of test inputs."""
    d, seed, batch_size = setup.data, setup.config.seed, setup.config.eval_batch_size
    x, y = d.x_test, d.y_test
    draws = seeded_draws(model, guide, samples, seed)  # made once, for every batch
    if d.task == "regress":
        step = min(batch_size, points_per_chunk(samples, len(x)))
        chunks = (
            (out["locs"], out["noise_var"], y[i : i + step])
            for i in range(0, len(x), step)
            for out in [predict_batch(model, guide, x[i : i + step], samples, "regress", seed, draws)]
        )
        return regression_metrics_in_chunks(chunks, d.y_mean, d.y_std)
    accumulator = PredictionAccumulator(y, samples, d.num_classes)
    with evaluating(model):
        for start in range(0, len(x), batch_size):
            outputs = draw_outputs(model, guide, x[start : start + batch_size], samples, seed, draws)
            for k, (out, _) in enumerate(outputs):
                accumulator.add(k, start, torch.log_softmax(out.double(), dim=-1))
    return accumulator.result()


class Evaluate(Callback):
    """The test evaluation every ``eval_every`` epochs and after the last, into the epoch's metrics row."""

    def _evaluate(self, loop, row: dict) -> None:
        start = time.perf_counter()
        row.update(evaluate_setup(loop.setup, loop.progress.epoch))
        row["eval_seconds"] = round(time.perf_counter() - start, 3)

    def catch_up(self, loop, row: dict) -> None:
        # the epoch's row as the longer run would have written it: evaluated after the pass just made up, or
        # not at all if the evaluation schedule skips it
        if math.isnan(row["bmr_seconds"]):  # no pass was made up: the row stands
            return
        for key in (*EVALUATED, "eval_seconds"):
            row.pop(key, None)
        if loop.progress.epoch % loop.config.eval_every == 0:
            self._evaluate(loop, row)

    def end_of_epoch(self, loop, row: dict) -> None:
        c = loop.config
        if loop.progress.epoch % c.eval_every == 0 or loop.progress.epoch == c.epochs:
            self._evaluate(loop, row)
