"""Export a run's rebuilt network: its size, accuracy and CPU latency in the trained shapes and with its dead units
cut, and files to deploy."""

from __future__ import annotations

import io
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from pyrozoo.bmr.rebuild import parameter_count, rebuild
from pyrozoo.io import atomic_write_folder, save_torch
from pyrozoo.posteriors import POSTERIORS, make_source


def pruned_results(folder: Path) -> dict[str, Path]:
    """The pruned results in a run folder, by the posterior source they were pruned from, newest first."""
    files = {name: Path(folder) / make_source(name).file for name in POSTERIORS}
    found = {name: path for name, path in files.items() if path.exists()}
    return dict(sorted(found.items(), key=lambda item: item[1].stat().st_mtime_ns, reverse=True))


def latency_ms(net: nn.Module, example: torch.Tensor, repeats: int = 50) -> float:
    """Median milliseconds of one forward pass on ``example``."""
    with torch.inference_mode():
        for _ in range(5):
            net(example)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            net(example)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _bytes(net: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    return buffer.tell()


def save_net(net: nn.Module, example: torch.Tensor, state_dict: Path, whole: Path, program: Path) -> None:
    """Write ``net`` three ways: its ``state_dict``, the module saved whole (a pickle: opened with
    ``torch.load(path, weights_only=False)`` by whoever trusts it) and a ``torch.export`` program traced on
    ``example`` with a free batch size, for deployment."""
    save_torch(net.state_dict(), state_dict)
    save_torch(net, whole)
    # a copy: a slice of the test set is a view, and the program would store the whole tensor under it
    example = example.clone()
    exported = torch.export.export(net.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    save_torch(exported, program, torch.export.save)


# what an export folder holds: an earlier export is replaced whole, a folder holding anything else is refused
EXPORT_FILES = frozenset({"sparse_state_dict.pt", "sparse_net.pt", "sparse.pt2", "summary.json"})


def export(run, folder: Path, repeats: int = 50, source: dict | None = None, nets=None) -> dict:
    """Write the rebuilt sparse net and return a summary (sizes, accuracy or a regression's RMSE, latency): the
    pruned net in the trained shapes (``full_shapes``, pruned weights at zero) against the same net with its dead
    units cut (``units_cut``); ``trained_parameters`` is the dense count, ``nonzero_ratio`` that count over the
    cut net's non-zero parameters.

    ``folder/sparse.pt2`` is a ``torch.export`` program for deployment; ``sparse_net.pt`` the whole module
    (``torch.load(path, weights_only=False)``; a rebuilt timm model is still a timm model, to fine-tune);
    ``sparse_state_dict.pt`` its weights only (their shapes differ from the dense net's where units went).
    ``source`` (which state was exported: checkpoint or pruned.pt, its epoch, step and checkpoint checksum;
    by default the run's checkpoint) goes into ``summary.json``. ``nets``, ``(dense, sparse)``, exports those
    instead of the run's own rebuilt nets (a pruned plain net, :meth:`pyrozoo.posteriors.PosteriorSource.load_pruned`).
    """
    d = run.data
    if nets is None:
        nets = [rebuild(run.model, run.guide, remove_dead=dead) for dead in (False, True)]
    score = "rmse" if d.task == "regress" else "accuracy"
    scores = [run.net_metrics(net)[score] for net in nets]
    dense, sparse = (net.cpu() for net in nets)
    x_test = d.x_test.cpu()
    summary = {"source": source or {"state": "checkpoint", **run.source()}}
    # named as pyrozoo export prints them: the pruned net in the trained shapes, and with its dead units cut
    for name, net, value in (("full_shapes", dense, scores[0]), ("units_cut", sparse, scores[1])):
        summary[name] = {
            "parameters": parameter_count(net),
            "nonzero_parameters": parameter_count(net, nonzero=True),
            "bytes": _bytes(net),
            score: value,
            "latency_ms_batch1": latency_ms(net, x_test[:1], repeats),
            "latency_ms_batch256": latency_ms(net, x_test[:256], repeats),
        }
    summary["speedup_batch256"] = (
        summary["full_shapes"]["latency_ms_batch256"] / summary["units_cut"]["latency_ms_batch256"]
    )
    summary["parameter_ratio"] = summary["full_shapes"]["parameters"] / summary["units_cut"]["parameters"]
    summary["nonzero_ratio"] = summary["full_shapes"]["parameters"] / max(
        summary["units_cut"]["nonzero_parameters"], 1
    )
    summary["trained_parameters"] = summary["full_shapes"]["parameters"]  # the dense count, before pruning
    summary["threads"] = torch.get_num_threads()

    def write(tmp: Path) -> None:
        save_net(sparse, x_test[:2], tmp / "sparse_state_dict.pt", tmp / "sparse_net.pt", tmp / "sparse.pt2")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))

    atomic_write_folder(folder, write, EXPORT_FILES)
    return summary
