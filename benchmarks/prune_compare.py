"""A BMR run's rebuilt net next to its ``flat-map`` twin pruned to the same sparsity by global magnitude and by
Torch-Pruning's L1 channel pruning: test accuracy, NLL, ECE, pruned fraction, parameters, and CPU
latency at batch 256 against the dense net, all measured in this one process: metrics on the device the runs'
data are on (the GPU for runs trained there), latencies on the CPU, the nets timed in turns (one thread by
default).

    python benchmarks/prune_compare.py BMR_RUN FLAT_MAP_RUN [--repeats 10] [--threads 1] [--units]
        [--test-size N] [--out summary.json]

The sparsity is the BMR run's last pruned fraction (docs/method.md#pruned-fraction: over the prunable layers,
all weight layers but the output layer, biases included). Magnitude pruning
(``pyrozoo.baselines.magnitude_prune``) and channel pruning (``pyrozoo.sweep.channel_prune``:
``MagnitudePruner`` with L1 importance, one ratio for every layer, found by bisection to remove that fraction
of the prunable parameters) are the ones ``pyrozoo sweep`` runs.
A magnitude-pruned net keeps the dense shapes, so its latency is the dense net's (zeros are still multiplied);
it is not timed again. The BMR net's own metrics are the run's (its predictive, ``--samples`` draws; computed
here the same way where the run's last epoch was not evaluated, or with ``--test-size``); its rebuilt net's
(the posterior mean, dead units removed) are measured here. ``--units`` adds a structured pass (``UnitReduction``:
whole coupled channel groups whose removal raises the evidence) on the BMR run, rebuilt again;
``--laplace-units N`` the same pass on the flat-map run's diagonal Laplace posterior (fitted on N training images).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch
from torch.nn.utils import prune as torch_prune

from pyrozoo.baselines import magnitude_prune
from pyrozoo.costs import paired_ratios
from pyrozoo.bmr import UnitReduction, pruned_fraction
from pyrozoo.bmr.rebuild import parameter_count, rebuild
from pyrozoo.posteriors.laplace import laplace_from_run
from pyrozoo.metrics import evaluate_net
from pyrozoo.sweep import _prunable_params, channel_prune
from pyrozoo.evaluation import evaluate
from pyrozoo.train import Run
from step_time import timed  # benchmarks/ is on the path when run as a script


def latencies(nets: dict, x: torch.Tensor, repeats: int, base: str) -> dict[str, tuple[float, float]]:
    """Per net: (median milliseconds of a forward pass on ``x``, the pass's time over ``base``'s in the same
    round, median), in eval mode, the nets timed round-robin in a shuffled order after one warm-up round
    (step_time's timer), so that load from other jobs falls on all of them alike."""
    for net in nets.values():
        net.eval()
    with torch.inference_mode():
        calls = {name: (lambda net=net: net(x)) for name, net in nets.items()}
        times = timed(calls, repeats, warmup=1)
    ratios = paired_ratios(times, base)
    return {name: (statistics.median(t) * 1e3, ratios[name][1]) for name, t in times.items()}


def _evaluated(metrics: dict) -> bool:
    return "accuracy" in metrics and metrics["accuracy"] == metrics["accuracy"]  # NaN where not evaluated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bmr_run")
    parser.add_argument("map_run")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default=None, help="write the summary here as JSON")
    parser.add_argument("--test-size", type=int, default=None, help="evaluate all on the first N test images")
    parser.add_argument("--units", action="store_true", help="also a UnitReduction pass on the BMR run, rebuilt")
    parser.add_argument(
        "--laplace-units",
        type=int,
        default=None,
        metavar="FIT_SIZE",
        help="also a UnitReduction pass on the flat-map run from a diagonal Laplace posterior fitted on FIT_SIZE "
        "training images, rebuilt",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet = lambda text: None  # noqa: E731

    bmr_run, map_run = Run.open(args.bmr_run, log=quiet), Run.open(args.map_run, log=quiet)
    d = map_run.data
    x, y, classes = d.x_test, d.y_test, d.num_classes  # where the runs' data are (the GPU if trained there)
    if args.test_size:
        x, y = x[: args.test_size], y[: args.test_size]
    bmr_last, map_last = bmr_run.history[-1], map_run.history[-1]  # the epochs the checkpoints hold
    own = not args.test_size  # the runs' own metrics are of the whole test set, when they were evaluated
    if not (own and _evaluated(bmr_last)):  # the run's predictive, as its evaluation computes it
        torch.manual_seed(bmr_run.config.seed * 100_003 + bmr_run.epoch)
        samples = bmr_run.config.samples
        bmr_last = {**bmr_last, **evaluate(bmr_run.model, bmr_run.guide, x, y, classes, samples, 500)}
    sparsity = float(bmr_last["pruned_fraction"])
    layers = map_run.model.layers
    rows = {}

    def row(name, net, metrics, pruned, seconds=0.0):
        keys = ("accuracy", "nll", "ece", "ece15", "brier")
        rows[name] = {
            **{k: float(metrics[k]) for k in keys if k in metrics},
            "pruned_fraction": pruned,
            "parameters": parameter_count(net),
            "nonzero_parameters": parameter_count(net, nonzero=True),
            "prunable_parameters": _prunable_params(net, layers),
            "seconds_to_prune": seconds,
        }

    def scored(net):  # the metrics of a deterministic net, on the data's device; the net is left on the CPU
        metrics = evaluate_net(net.to(x.device), x, y, classes)
        net.cpu()
        return metrics

    dense = rebuild(map_run.model, map_run.guide, remove_dead=False).cpu().eval()
    dense_metrics = map_last if own and _evaluated(map_last) else scored(dense)
    row("flat-map dense", dense, dense_metrics, 0.0)

    start = time.perf_counter()
    bmr_net = rebuild(bmr_run.model, bmr_run.guide).cpu().eval()
    seconds = time.perf_counter() - start
    row(f"{bmr_run.config.method} (run's predictive)", bmr_net, bmr_last, sparsity)
    row(f"{bmr_run.config.method} rebuilt (posterior mean)", bmr_net, scored(bmr_net),
        sparsity, seconds)  # fmt: skip

    if args.units:  # whole coupled channel groups whose removal raises the evidence, then rebuilt again
        start = time.perf_counter()
        UnitReduction()(bmr_run.model, bmr_run.guide)
        units_net = rebuild(bmr_run.model, bmr_run.guide).cpu().eval()
        seconds = time.perf_counter() - start
        row(f"{bmr_run.config.method} + units pass, rebuilt", units_net, scored(units_net),
            pruned_fraction(bmr_run.model), seconds)  # fmt: skip

    laplace_name = "flat-map + diagonal Laplace, units pass, rebuilt"
    if args.laplace_units:  # coupled channel groups whose removal raises the Laplace evidence
        start = time.perf_counter()
        model, posterior = laplace_from_run(
            map_run, "diag", progress=False, fit_size=args.laplace_units, batch_size=16
        )
        report = UnitReduction()(model, posterior)
        laplace_net = rebuild(model, posterior).cpu().eval()
        seconds = time.perf_counter() - start
        row(
            laplace_name,
            laplace_net,
            scored(laplace_net),
            report.pruned_fraction,
            seconds,
        )

    start = time.perf_counter()
    magnitude = copy.deepcopy(dense)
    masks = magnitude_prune(magnitude, layers, sparsity, "global")
    for module in magnitude.modules():  # the masks made permanent, so that the zeros are counted
        for name in [
            n[: -len("_mask")] for n, _ in module.named_buffers(recurse=False) if n.endswith("_mask")
        ]:
            torch_prune.remove(module, name)
    achieved = 1 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    seconds = time.perf_counter() - start
    row("flat-map + global magnitude", magnitude, scored(magnitude), achieved, seconds)

    start = time.perf_counter()
    channels, achieved = channel_prune(dense, layers, d.x_train[:2].cpu(), sparsity)
    seconds = time.perf_counter() - start
    row(
        "flat-map + Torch-Pruning L1 channels",
        channels,
        scored(channels),
        achieved,
        seconds,
    )

    nets = {"flat-map dense": dense, "bmr": bmr_net, "flat-map + Torch-Pruning L1 channels": channels}
    if args.units:
        nets["units"] = units_net
    if args.laplace_units:
        nets[laplace_name] = laplace_net
    measured = latencies(nets, x[: args.batch].cpu(), args.repeats, base="flat-map dense")
    for name, r in rows.items():
        key = ("units" if "units" in name else "bmr") if name.startswith(bmr_run.config.method) else name
        # magnitude pruning keeps the dense shapes
        r["latency_ms"], ratio = measured.get(key, measured["flat-map dense"])
        r["speedup"] = 1 / ratio  # paired per round
        r["parameter_ratio"] = rows["flat-map dense"]["parameters"] / r["parameters"]
    summary = {
        "bmr_run": str(bmr_run.out),
        "map_run": str(map_run.out),
        "sparsity": sparsity,
        "test_images": len(x),
        "bmr_epoch": bmr_run.epoch,
        "map_epoch": map_run.epoch,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "rows": rows,
    }
    print(
        f"{'':42s} {'acc':>6s} {'ECE':>6s} {'NLL':>6s} {'pruned':>7s} {'params':>10s} {'ms/256':>8s} {'speedup':>7s}"
    )
    for name, r in rows.items():
        print(
            f"{name:42s} {r['accuracy']:6.4f} {r['ece']:6.4f} {r['nll']:6.3f} {r['pruned_fraction']:7.4f} "
            f"{r['parameters']:10d} {r['latency_ms']:8.1f} {r['speedup']:7.2f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
