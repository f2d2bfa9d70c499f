"""Data-parallel training (pyrozoo.distributed): two gloo processes on the CPU against one process.

- The gradient the two ranks share, from their parts of one global minibatch, is the one-process gradient on the
  whole minibatch (float64, 1e-10), for an even and an uneven split; one optimiser step leaves both ranks with the
  same parameters, equal to the one-process step.
- Sharded evaluation gathers what one process computes; a broadcast makes rank 0's masks every rank's; what
  rank 0 decides every rank gets, and a user error on rank 0 stops the other ranks too.
- A ``torchrun`` run of 2 processes killed mid-epoch resumes with 1 process to the state of an uninterrupted
  2-process run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyro
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pyrozoo import distributed
from pyrozoo.errors import PyrozooError
from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.nets import create_net
from pyrozoo.runfolder import CHECKPOINT, CONFIG, METRICS
from pyrozoo.steps import svi_step

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (8, 7)  # split 4 + 4 and 4 + 3 over two ranks
DATASET_SIZE = 1000


def _problem():
    """A float64 MLP, its mean-field guide, Adam, and 8 points: the same on every process."""
    torch.manual_seed(0)
    net = create_net("mlp", in_channels=1, image_size=4, num_classes=3, hidden=(5, 4))
    model = BayesianModel(net).double()
    guide = make_guide("meanfield", model).double()
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.01)
    x = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    return model, guide, optimizer, x, y


def _step(world: distributed.World, batch: int) -> dict:
    model, guide, optimizer, x, y = _problem()
    part, weight = world.split(torch.arange(batch))
    pyro.set_rng_seed(1)  # the same weight draw on every rank, as a run's synchronised streams give
    loss = svi_step(model, guide, optimizer, x[part], y[part], DATASET_SIZE, share=world.share_hook(weight))
    return {
        "loss": loss,
        "grads": {name: p.grad.clone() for name, p in guide.named_parameters()},
        "params": {name: p.detach().clone() for name, p in guide.named_parameters()},
    }


def _worker(rank: int, size: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        torch.set_num_threads(1)
        world = distributed.current()
        result = {"steps": {batch: _step(world, batch) for batch in BATCHES}}

        # evaluation: each rank its part of a batch of 5, gathered
        weights = torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        seen = []

        def draw(xb):
            seen.append(len(xb))
            return torch.log_softmax(xb @ weights, dim=-1)

        result["gathered"] = world.sharded(draw)(x)
        result["seen"] = seen
        # several draws at once: [K, B, C], the points along dim 1
        result["gathered_k"] = world.sharded(lambda xb: torch.stack([draw(xb), 2 * draw(xb)]), points_dim=1)(
            x
        )

        # a batch of one point: rank 1 has none, and a net that flattens by view(B, -1) cannot take an empty one
        result["one"] = world.sharded(lambda xb: draw(xb.view(len(xb), -1)))(x[:1])

        # rank 0's masks (and the model's record of pruned layers) become every rank's
        model, guide, *_ = _problem()
        layer = model.layers[0].name
        keep = torch.ones_like(model.mask(layer))
        keep[0, rank] = 0  # differs between the ranks
        model.set_mask(layer, keep)
        world.broadcast(model, guide)
        result["mask"] = model.mask(layer).clone()
        result["pruned"] = sorted(model._pruned)

        # a user error on rank 0 stops every rank
        def fail():
            raise PyrozooError("rank 0 cannot go on")

        try:
            world.agree(fail)
        except PyrozooError as e:
            result["error"] = (type(e).__name__, str(e))
        result["agreed"] = world.agree(lambda: f"decided by rank {rank}")  # e.g. a timing: rank 0's for all
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def forked_ranks(worker, folder: Path) -> list[dict]:
    """What ``worker(rank, 2, init_file, folder)`` saved as ``folder/rank{r}.pt`` on each of two gloo ranks."""
    # forked (one torch thread, see conftest), which spares each worker the seconds of importing pyrozoo again
    mp.start_processes(
        worker, args=(2, str(folder / "init"), str(folder)), nprocs=2, join=True, start_method="fork"
    )
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return forked_ranks(_worker, tmp_path_factory.mktemp("gloo"))


@pytest.mark.parametrize("batch", BATCHES)
def test_two_ranks_share_the_one_process_gradient_and_step(ranks, batch):
    one = _step(distributed.World(), batch)
    a, b = (r["steps"][batch] for r in ranks)
    for name, grad in one["grads"].items():
        assert grad.dtype == torch.float64
        torch.testing.assert_close(a["grads"][name], grad, rtol=0, atol=1e-10)
        assert torch.equal(a["grads"][name], b["grads"][name]), name
        torch.testing.assert_close(a["params"][name], one["params"][name], rtol=0, atol=1e-10)
        assert torch.equal(a["params"][name], b["params"][name]), name
    assert a["loss"] == b["loss"] and abs(a["loss"] - one["loss"]) <= 1e-10 * abs(one["loss"])


def test_a_plain_average_of_an_uneven_split_would_not_be_the_gradient(ranks):
    """What the weights b_r / B are for: the split 4 + 3 averaged with equal weights misses by far."""
    one = _step(distributed.World(), 7)
    parts = [_step(distributed.World(), 4), None]
    model, guide, optimizer, x, y = _problem()
    pyro.set_rng_seed(1)
    svi_step(model, guide, optimizer, x[4:7], y[4:7], DATASET_SIZE)
    parts[1] = {name: p.grad for name, p in guide.named_parameters()}
    name = next(iter(one["grads"]))
    average = (parts[0]["grads"][name] + parts[1][name]) / 2
    assert not torch.allclose(average, one["grads"][name], atol=1e-6)
    torch.testing.assert_close(ranks[0]["steps"][7]["grads"][name], one["grads"][name], rtol=0, atol=1e-10)


def test_sharded_evaluation_gathers_the_whole_batch(ranks):
    weights = torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    whole = torch.log_softmax(x @ weights, dim=-1)
    for rank, part in zip(ranks, (3, 2)):
        # each rank computed only its part; of a batch of one, rank 1's part is empty and it runs one point
        assert rank["seen"] == [part, part, part, 1]
        torch.testing.assert_close(rank["gathered"], whole, rtol=0, atol=0)
        torch.testing.assert_close(rank["gathered_k"], torch.stack([whole, 2 * whole]), rtol=0, atol=0)
        torch.testing.assert_close(rank["one"], whole[:1], rtol=0, atol=0)


def test_a_broadcast_gives_every_rank_the_masks_of_rank_0(ranks):
    for rank in ranks:
        assert rank["mask"][0, 0] == 0 and rank["mask"][0, 1] == 1
        assert rank["pruned"] == ranks[0]["pruned"] != []


def test_a_user_error_on_rank_0_stops_every_rank(ranks):
    assert ranks[0]["error"] == ("PyrozooError", "rank 0 cannot go on")
    assert ranks[1]["error"] == ("RankZeroStopped", "rank 0 cannot go on")


def test_what_rank_0_decides_every_rank_gets(ranks):
    assert [rank["agreed"] for rank in ranks] == ["decided by rank 0"] * 2


# --- whole runs under torchrun --------------------------------------------------------------------------

RUN = [
    "--data", "fashion-mnist-mini", "--net", "mlp", "--net-option", "hidden=(16,)", "--method", "bmr-th",
    "--warmup-steps", "0", "--epochs", "3", "--steps-per-epoch", "3", "--batch-size", "32", "--samples", "2",
    "--no-progress",
]  # fmt: skip


def _env(fault: str | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS="1")
    env.pop("PYROZOO_FAULT", None)
    if fault:
        env["PYROZOO_FAULT"] = fault
    return env


def torchrun(*argv: str, cwd: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return subprocess.run(
        [*command, *([str(ROOT / "tests" / "faults.py")] if fault else ["-m", "pyrozoo"]), *argv],
        cwd=cwd,
        env=_env(fault),
        capture_output=True,
        text=True,
        timeout=600,
    )


def one_process(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pyrozoo", *argv]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def assert_close_runs(a: Path, b: Path) -> None:
    """Two runs that differ only by float rounding (the order of a sum over processes): the same masks and
    steps, parameters and metrics to 1e-5."""
    sa, sb = (torch.load(f / CHECKPOINT, weights_only=False) for f in (a, b))
    assert (sa["epoch"], sa["step"]) == (sb["epoch"], sb["step"])
    for key in ("guide", "model"):
        assert list(sa[key]) == list(sb[key])
        for name in sa[key]:
            if ".masks." in f".{name}" or name.startswith("masks."):
                assert torch.equal(sa[key][name], sb[key][name]), name
            else:
                torch.testing.assert_close(sa[key][name], sb[key][name], rtol=1e-5, atol=1e-6, msg=name)
    assert torch.equal(sa["batches"]["order"], sb["batches"]["order"])
    assert sa["batches"]["position"] == sb["batches"]["position"]
    assert torch.equal(sa["rng"]["torch"], sb["rng"]["torch"])
    ma, mb = pd.read_csv(a / METRICS), pd.read_csv(b / METRICS)
    columns = [c for c in ma.columns if not c.endswith("seconds")]
    pd.testing.assert_frame_equal(ma[columns], mb[columns], rtol=1e-5)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("torchrun")
    done = torchrun("train", *RUN, "--out", "run", cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("metrics per evaluated epoch") == 1  # rank 0 alone prints
    return cwd / "run"


@pytest.mark.slow
def test_two_processes_train_what_one_process_trains(tmp_path, two_processes):
    done = one_process("train", *RUN, "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_close_runs(tmp_path / "run", two_processes)
    names = sorted(p.name for p in two_processes.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "run").iterdir())  # rank 1 wrote nothing of its own


@pytest.mark.slow  # subprocesses: 1-2 minutes on a busy 2-core machine
def test_a_killed_two_process_run_resumes_with_one_process(tmp_path, two_processes):
    killed = torchrun("train", *RUN, "--out", "run", cwd=tmp_path, fault="step@5")  # mid-epoch 2
    assert killed.returncode != 0
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)["epoch"] == 1
    assert (tmp_path / "run" / CONFIG).exists()
    done = one_process("train", "--out", "run", "--resume", "--no-progress", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_close_runs(tmp_path / "run", two_processes)


@pytest.mark.slow
def test_more_processes_than_points_in_a_batch_is_one_error(tmp_path):
    argv = [a if a != "32" else "1" for a in RUN]
    done = torchrun("train", *argv, "--out", "run", cwd=tmp_path)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("pyrozoo: error:")]
    assert len(lines) == 2 and "smaller than the 2 processes" in lines[0]  # each rank finds it itself
    assert "internal error" not in done.stderr  # (torchrun's agent prints a traceback of its own)
    assert not (tmp_path / "run").exists()
