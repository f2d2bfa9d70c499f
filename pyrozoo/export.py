"""Export a run's rebuilt network: dense vs sparse size, accuracy and CPU latency, and files to deploy."""

from __future__ import annotations

import copy
import io
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from pyrozoo.bmr.rebuild import parameter_count, rebuild
from pyrozoo.errors import PyrozooError, reason
from pyrozoo.io import atomic_write_folder, save_torch
from pyrozoo.torchfile import load_tensors
from pyrozoo.runfolder import PRUNED

# what ``pyrozoo prune RUN --posterior P`` writes into the run folder, by P
PRUNED_FILES = {
    "run": PRUNED,
    "laplace-diag": "pruned-laplace-diag.pt",
    "laplace-kfac": "pruned-laplace-kfac.pt",
}


def pruned_results(folder: Path) -> dict[str, Path]:
    """The pruned results in a run folder, by the posterior they were pruned from, newest first."""
    found = {
        kind: Path(folder) / name for kind, name in PRUNED_FILES.items() if (Path(folder) / name).exists()
    }
    return dict(sorted(found.items(), key=lambda item: item[1].stat().st_mtime_ns, reverse=True))


def laplace_pruned_nets(run, posterior: str) -> tuple[nn.Module, nn.Module, dict]:
    """The net that ``pyrozoo prune RUN --posterior laplace-diag|laplace-kfac`` pruned, as the dense net (pruned
    weights at exact zeros, survivors at the reduced posterior mean) and the sparse one (dead units cut out),
    and the state's record; refused when the run's checkpoint has changed since it was pruned."""
    from pyrozoo.bmr.units import remove_dead_units
    from pyrozoo.models import BayesianModel
    from pyrozoo.guides.laplace import FixedScales

    path = run.out / PRUNED_FILES[posterior]
    redo = f"prune again (pyrozoo prune {run.out} --posterior {posterior} ...), or delete {path}"
    try:
        state = load_tensors(path, fix=redo)
        if not isinstance(state, dict) or not {"net_state_dict", "masks", "laplace", "source"} <= set(state):
            raise ValueError("not a pyrozoo Laplace-pruned state")
    except FileNotFoundError:
        raise PyrozooError(
            f"{run.out} has no {path.name}: run pyrozoo prune {run.out} --posterior {posterior} first"
        ) from None
    except PyrozooError:
        raise
    except Exception as e:
        raise PyrozooError(f"{path} is corrupt or truncated ({reason(e)}): {redo}") from None
    made, current = state["source"], run.source()
    if made != current:
        raise PyrozooError(
            f"{path} was pruned from the checkpoint of epoch {made.get('epoch')}, step {made.get('step')}, but "
            f"the run's checkpoint is now epoch {current['epoch']}, step {current['step']}"
            + (
                ""
                if made.get("checkpoint_sha256") == current["checkpoint_sha256"]
                else " (written again since)"
            )
            + f": {redo}"
        )
    dense = rebuild(run.model, run.guide, remove_dead=False).cpu()  # the run's net, its original architecture
    try:
        dense.load_state_dict(state["net_state_dict"])
    except (RuntimeError, KeyError) as e:
        raise PyrozooError(f"{path} does not fit this run ({reason(e)}): {redo}") from None
    output = next(layer.name for layer in run.model.layers if layer.is_output)
    scales = {r["layer"]: r["prior_scale"] for r in state["laplace"]}
    sparse = copy.deepcopy(dense)
    model = BayesianModel(sparse, prior=FixedScales(scales), output=output, likelihood=run.model.likelihood)
    for name, mask in state["masks"].items():
        model.set_mask(name, mask)
    remove_dead_units(sparse, model)
    return dense, sparse.eval(), state


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
    exported = torch.export.export(net.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    save_torch(exported, program, torch.export.save)


def export(run, folder: Path, repeats: int = 50, source: dict | None = None, nets=None) -> dict:
    """Write the rebuilt sparse net and return a summary (sizes, accuracy or a regression's RMSE, latency,
    dense against sparse).

    ``folder/sparse.pt2`` is a ``torch.export`` program for deployment; ``sparse_net.pt`` the whole module
    (``torch.load(path, weights_only=False)``; a rebuilt timm model is still a timm model, to fine-tune);
    ``sparse_state_dict.pt`` its weights only (their shapes differ from the dense net's where units went).
    ``source`` (which state was exported: checkpoint or pruned.pt, its epoch, step and checkpoint checksum;
    by default the run's checkpoint) goes into ``summary.json``. ``nets``, ``(dense, sparse)``, exports those
    instead of the run's own rebuilt nets (a Laplace-pruned result, :func:`laplace_pruned_nets`).
    """
    d = run.data
    if nets is None:
        nets = [rebuild(run.model, run.guide, remove_dead=dead) for dead in (False, True)]
    score = "rmse" if d.task == "regress" else "accuracy"
    scores = [run.net_metrics(net)[score] for net in nets]
    dense, sparse = (net.cpu() for net in nets)
    x_test = d.x_test.cpu()
    summary = {"source": source or {"state": "checkpoint", **run.source()}}
    for name, net, value in (("dense", dense, scores[0]), ("sparse", sparse, scores[1])):
        summary[name] = {
            "parameters": parameter_count(net),
            "nonzero_parameters": parameter_count(net, nonzero=True),
            "bytes": _bytes(net),
            score: value,
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
        save_net(sparse, x_test[:2], tmp / "sparse_state_dict.pt", tmp / "sparse_net.pt", tmp / "sparse.pt2")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))

    atomic_write_folder(folder, write)
    return summary
