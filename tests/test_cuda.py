"""The CUDA suite: ``--device cuda`` end to end. Skipped where torch sees no GPU; ``.ci/run`` runs it (slow ones
included: ``python -m pytest -m cuda``) where ``torch.cuda.is_available()``.

A run on the GPU trains, evaluates, makes BMR passes (weights and whole units), checkpoints and resumes to the
run an uninterrupted one gives, prunes and exports (the export rebuilds the sparse net on the CPU); its data sit on
the GPU, moved there once. With two GPUs, ``torchrun`` with NCCL trains what one process trains.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from configs import tiny_config

from pyrozoo.cli import main
from pyrozoo.config import TrainConfig
from pyrozoo.runfolder import CHECKPOINT
from pyrozoo.train import Run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device"),
]


def tiny(**overrides) -> TrainConfig:
    lenet = dict(net="lenet", net_options={"channels": (4, 6, 8), "hidden": 16})
    changes = dict(
        method="bmr-th", epochs=3, steps_per_epoch=5, warmup_steps=0, device="cuda", prune_units=True
    )
    return tiny_config(**{**lenet, **changes, **overrides})


def quiet(text: str) -> None:
    pass


def test_a_run_trains_evaluates_and_prunes_on_the_gpu(tmp_path):
    with Run(tiny(), tmp_path / "run", log=quiet) as run:
        # the data are on the GPU, put there once, and so is everything the step touches
        for tensor in (run.data.x_train, run.data.y_train, run.data.x_test, run.data.y_test):
            assert tensor.device.type == "cuda"
        assert all(p.device.type == "cuda" for p in run.guide.parameters())
        assert all(b.device.type == "cuda" for b in run.model.buffers())
        table = run.train(progress=False)
        assert table["accuracy"].notna().all() and table["pruned_fraction"].iloc[-1] > 0
        assert all(b.device.type == "cuda" for b in run.model.buffers())  # masks stayed on the GPU


def test_a_gpu_run_resumes_to_the_uninterrupted_run(tmp_path):
    with Run(tiny(), tmp_path / "straight", log=quiet) as run:
        run.train(progress=False)
    with Run(tiny(epochs=1), tmp_path / "resumed", log=quiet) as run:
        run.train(progress=False)
    with Run.open(tmp_path / "resumed", log=quiet, epochs=3) as run:
        run.train(progress=False)
    a = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=False)
    b = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)
    for key in ("guide", "model"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-5, atol=1e-6, msg=name)


def test_prune_and_export_a_gpu_run(tmp_path, capsys):
    with Run(tiny(), tmp_path / "run", log=quiet) as run:
        run.train(progress=False)
    assert main(["prune", str(tmp_path / "run"), "--rule", "threshold"]) == 0
    assert main(["export", str(tmp_path / "run"), "--repeats", "2"]) == 0
    assert (tmp_path / "run" / "export" / "sparse.pt2").exists()


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpu_processes_train_what_one_process_trains(tmp_path):
    from test_distributed import RUN, assert_close_runs

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PYROZOO_FAULT", None)
    argv = [*RUN, "--device", "cuda"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for command, out in (
        ([*torchrun, "-m", "pyrozoo", "train", *argv, "--out", "two"], "two"),
        ([sys.executable, "-m", "pyrozoo", "train", *argv, "--out", "one"], "one"),
    ):
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
    assert_close_runs(tmp_path / "one", tmp_path / "two")


def test_compress_fine_tunes_on_the_gpu_and_measures_on_the_cpu():
    """``compress(device="cuda")``: the data are moved to the GPU for the fine-tunes and the test metrics; the
    nets it returns, and the net it was given, are on the CPU, where their latency was timed; their latency on the
    GPU is read from copies."""
    from pyrozoo.compress import compress

    torch.manual_seed(0)
    x, y = torch.randn(256, 1, 8, 8), torch.randint(0, 3, (256,))
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(6 * 8 * 8, 3),
    )  # fmt: skip
    result = compress(net, (x, y, x, y), "params=0.5", finetune_steps=3, batch_size=16, fit_size=None,
                      baselines=("tp-l1",), repeats=1, device="cuda", calibrate=100, progress=False,
                      log=quiet)  # fmt: skip
    assert all(p.device.type == "cpu" for p in result.net.parameters())
    assert all(row["temperature"] > 0 for row in result.table)  # the held-out logits read on the GPU
    assert all(p.device.type == "cpu" for p in net.parameters())
    assert [row["method"] for row in result.table] == ["dense", "dense+finetune", "pyrozoo", "tp-l1"]
    assert all(0 <= row["accuracy"] <= 1 for row in result.table)
    # with a GPU, each row's latency on it as well, a ratio to the dense net's there
    assert all(row["gpu_latency_b1"] > 0 and row["gpu_latency_b256"] > 0 for row in result.table)
    assert result.table[0]["gpu_latency_b256"] == 1.0


def test_the_compress_gpu_script_runs_on_the_gpu(tmp_path):
    """scripts/compress_resnet18_gpu.sh at a tiny setting on the GPU: training, compress and the report."""
    env = {**os.environ, "OUT": str(tmp_path), "NET": "lenet", "DATA": "fashion-mnist-mini", "EPOCHS": "0.5",
           "STEPS": "2", "FIT_SIZE": "64", "REPEATS": "1", "THREADS": "2", "BASELINES": "tp-l1"}  # fmt: skip
    done = subprocess.run(["bash", "scripts/compress_resnet18_gpu.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "compress" / "report.json").is_file()
