"""Export a run's rebuilt network: dense vs sparse size, accuracy and CPU latency, and files to deploy."""

from __future__ import annotations

import io
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from pyrozoo.bmr.rebuild import parameter_count, rebuild
from pyrozoo.io import atomic_write_folder
from pyrozoo.metrics import evaluate_net


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


def export(run, folder: Path, repeats: int = 50, source: dict | None = None) -> dict:
    """Write the rebuilt sparse net and return a summary (sizes, accuracy, latency, dense against sparse).

    ``folder/sparse.pt2`` is a ``torch.export`` program for deployment; ``sparse_net.pt`` the whole module
    (``torch.load(path, weights_only=False)``; a rebuilt timm model is still a timm model, to fine-tune);
    ``sparse_state_dict.pt`` its weights only (their shapes differ from the dense net's where units went).
    ``source`` (which state was exported: checkpoint or pruned.pt, its epoch, step and checkpoint checksum;
    by default the run's checkpoint) goes into ``summary.json``.
    """
    d = run.data
    dense = rebuild(run.model, run.guide, remove_dead=False).cpu()
    sparse = rebuild(run.model, run.guide, remove_dead=True).cpu()
    x_test, y_test = d.x_test.cpu(), d.y_test.cpu()
    summary = {"source": source or {"state": "checkpoint", **run.source()}}
    for name, net in (("dense", dense), ("sparse", sparse)):
        summary[name] = {
            "parameters": parameter_count(net),
            "nonzero_parameters": parameter_count(net, nonzero=True),
            "bytes": _bytes(net),
            "accuracy": evaluate_net(net, x_test, y_test, d.num_classes)["accuracy"],
            "latency_ms_batch1": latency_ms(net, x_test[:1], repeats),
            "latency_ms_batch256": latency_ms(net, x_test[:256], repeats),
        }
    summary["speedup_batch256"] = (
        summary["dense"]["latency_ms_batch256"] / summary["sparse"]["latency_ms_batch256"]
    )
    summary["parameter_ratio"] = summary["dense"]["parameters"] / summary["sparse"]["parameters"]
    summary["nonzero_ratio"] = summary["dense"]["parameters"] / max(
        summary["sparse"]["nonzero_parameters"], 1
    )
    summary["threads"] = torch.get_num_threads()

    def write(tmp: Path) -> None:
        torch.save(sparse.state_dict(), tmp / "sparse_state_dict.pt")
        torch.save(sparse, tmp / "sparse_net.pt")
        program = torch.export.export(sparse, (x_test[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, tmp / "sparse.pt2")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))

    atomic_write_folder(folder, write)
    return summary
