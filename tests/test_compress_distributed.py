"""``pyrozoo compress`` data-parallel (pyrozoo.distributed): two gloo processes on the CPU against one process.

- Its pieces, forked into two ranks: the fine-tune's step on split minibatches (an uneven split included) is the
  one-process step (float64, 1e-10) and leaves both ranks with the same net, with BatchNorm too (it normalises
  by the whole minibatch's statistics); the Laplace diagonal, the ranks taking parts of each batch (a last
  batch of one point included) with the labels one process draws, is the one-process curvature; sharded test
  metrics are the one-process ones; ``compress()`` gives both ranks the same table and nets, one process's.
- Under ``torchrun`` (slow), the command writes one report whose nets and metrics are one process's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_distributed import forked_ranks, one_process, torchrun
from torch import nn

from pyrozoo import distributed
from pyrozoo.baselines import finetune
from pyrozoo.compress import Target, compress
from pyrozoo.metrics import evaluate_net
from pyrozoo.models.layers import find_layers
from pyrozoo.models.likelihoods import Categorical, Gaussian
from pyrozoo.posteriors.laplace import curvature

BATCH = 7  # split 4 + 3 over two ranks: the weights b_r / B matter
SEEN: list[int] = []  # the batch sizes the first layer of a watched net (and of its copies) was run on


def _watched(net: nn.Sequential) -> nn.Sequential:
    """``net``, its first weight layer noting in SEEN the size of every batch it runs on (copies note too)."""
    first = next(m for m in net if isinstance(m, (nn.Linear, nn.Conv2d)))
    first.register_forward_pre_hook(lambda module, inputs: SEEN.append(len(inputs[0])))
    return net


def _mlp(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    norm = [nn.BatchNorm1d(6)] if batchnorm else []
    return _watched(nn.Sequential(nn.Flatten(), nn.Linear(16, 6), *norm, nn.Tanh(), nn.Linear(6, 3)).double())


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _tuned(world: distributed.World, batchnorm: bool = False) -> nn.Module:
    net = _mlp(batchnorm)
    finetune(net, *_data(), 3, 0.05, BATCH, 0, world=world)
    return net


def _curvature(world: distributed.World) -> dict:
    """The MC-Fisher diagonal over 9 points in batches of 4: 4 + 4 + 1, the last one on rank 0 alone."""
    net = _mlp().eval()
    x, _ = _data(9)
    return curvature(net, find_layers(net), x, "diag", batch_size=4, seed=3, progress=False, world=world)


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return _watched(nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 12), nn.ReLU(), nn.Linear(12, 3),
    ))  # fmt: skip


def _compressed():
    """compress() of a small CNN on random 3-class data: a params target (a cost every rank can count) and a
    latency one (timed by rank 0 for all)."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(96, 1, 8, 8, generator=g), torch.randint(0, 3, (96,), generator=g)
    targets = [*Target.parse("params=0.5"), *Target.parse("latency=0.9")]
    options = dict(finetune_steps=4, batch_size=15, fit_size=50, baselines=("tp-l1",), repeats=1)
    return compress(_cnn(), (x, y, x[:45], y[:45]), targets, progress=False, log=lambda text: None, **options)


def _worker(rank: int, size: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        torch.set_num_threads(1)
        world = distributed.current()
        result, seen = {}, {}

        def watch(name, make):
            SEEN.clear()
            result[name] = make()
            seen[name] = list(SEEN)

        watch("tuned", lambda: _tuned(world))
        watch("tuned_bn", lambda: _tuned(world, batchnorm=True).state_dict())
        watch("curvature", lambda: _curvature(world))
        watch("metrics", lambda: evaluate_net(result["tuned"], *_data(9), 3, batch_size=4, world=world))
        result["tuned"] = result["tuned"].state_dict()
        watch("compressed", _compressed)
        result["table"] = result["compressed"].table
        result["nets"] = {name: small.state_dict() for name, small in result.pop("compressed").nets.items()}
        result["seen"] = seen
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return forked_ranks(_worker, tmp_path_factory.mktemp("gloo"))


def _assert_same(a: dict, b: dict, atol: float) -> None:
    assert list(a) == list(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


def test_each_rank_computes_its_part_of_every_batch(ranks):
    a, b = (rank["seen"] for rank in ranks)
    assert (a["tuned"], b["tuned"]) == ([4] * 3, [3] * 3)  # 3 steps on batches of 7
    # the curvature: a check of the net's output, then batches of 4, 4 and 1
    assert (a["curvature"], b["curvature"]) == ([1, 2, 2, 1], [1, 2, 2])
    # the metrics: batches of 4, 4 and 1; rank 1 has no part of the last and runs one point it sends nothing of
    assert (a["metrics"], b["metrics"]) == ([2, 2, 1], [2, 2, 1])
    # compress: its fine-tunes' batches of 15 as 8 + 7, its test set of 45 as 23 + 22; the nets timed on the 45
    # test inputs (its first 256) by rank 0 alone. Its KFAC Laplace fit (curvlinops') is not split: each rank
    # fits on all 50 inputs, alike (the diagonal fit's split is the curvature's above)
    assert {8, 23, 45, 50} <= set(a["compressed"]) and {7, 22, 50} <= set(b["compressed"])
    assert 45 not in b["compressed"] and 15 not in a["compressed"] + b["compressed"]


def test_a_part_of_a_batch_draws_the_labels_one_process_draws_for_it():
    """The Monte Carlo Fisher's labels: torch.multinomial's draw (so one process's curvature is as before), and
    rows 3-5 of a batch of 7 drawn alone are rows 3-5 of the whole batch's draw."""
    out = torch.randn(7, 4, dtype=torch.float64)
    labels = torch.multinomial(out.softmax(-1), 1, generator=torch.Generator().manual_seed(5)).squeeze(-1)
    nll = -out.log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
    likelihood = Categorical()
    assert likelihood.sampled_nll(out, torch.Generator().manual_seed(5)) == nll.sum()
    part = likelihood.sampled_nll(out[3:6], torch.Generator().manual_seed(5), (3, 7))
    torch.testing.assert_close(part, nll[3:6].sum(), rtol=0, atol=1e-12)
    gaussian = Gaussian("fixed", 4.0)
    whole = torch.randn(7, 1, dtype=torch.float64)
    per_point = [
        gaussian.sampled_nll(whole[i : i + 1], torch.Generator().manual_seed(5), (i, 7)) for i in range(7)
    ]
    torch.testing.assert_close(sum(per_point), gaussian.sampled_nll(whole, torch.Generator().manual_seed(5)))


def test_the_fine_tune_on_split_minibatches_takes_the_one_process_steps(ranks):
    one = _tuned(distributed.World()).state_dict()
    assert not torch.equal(one["1.weight"], _mlp().state_dict()["1.weight"])  # it moved
    _assert_same(ranks[0]["tuned"], one, 1e-10)
    _assert_same(ranks[0]["tuned"], ranks[1]["tuned"], 0)


def test_batchnorm_normalises_by_the_whole_minibatch_as_in_one_process(ranks):
    """Each rank's BatchNorm uses the statistics of all ranks' parts (and backward passes through them), so the
    fine-tune with BatchNorm takes the one-process steps too, running statistics included."""
    one = _tuned(distributed.World(), batchnorm=True).state_dict()
    assert not torch.equal(one["2.running_var"], torch.ones(6, dtype=torch.float64))  # they moved
    # 1e-9: the bias before the BatchNorm has no gradient but rounding (the normalisation removes it), which
    # Adam's step, divided by its root mean square, enlarges (1.4e-10 measured; every other entry within 1e-16)
    _assert_same(ranks[0]["tuned_bn"], one, 1e-9)
    _assert_same(ranks[0]["tuned_bn"], ranks[1]["tuned_bn"], 0)


def test_the_laplace_diagonal_shared_over_ranks_is_the_one_process_sum(ranks):
    one = _curvature(distributed.World())
    _assert_same(ranks[0]["curvature"], one, 1e-10)
    _assert_same(ranks[0]["curvature"], ranks[1]["curvature"], 0)


def test_sharded_test_metrics_are_the_one_process_metrics(ranks):
    one = evaluate_net(_tuned(distributed.World()), *_data(9), 3, batch_size=4)
    for rank in ranks:
        assert rank["metrics"] == pytest.approx(one, rel=1e-9, abs=1e-12)


def test_compress_gives_every_rank_one_result_and_one_process_its_nets(ranks):
    a, b = ranks
    assert a["table"] == b["table"]  # latencies included: rank 0 timed them for both
    _assert_same(a["nets"]["latency=0.9"], b["nets"]["latency=0.9"], 0)
    one = _compressed()
    # float32: the two parts' mean gradients summed differ from the whole batch's mean in the last bits
    _assert_same(a["nets"]["params=0.5"], one.nets["params=0.5"].state_dict(), 1e-5)
    rows = [(r["method"], r["target"]) for r in one.table]
    assert rows == [(r["method"], r["target"]) for r in a["table"]]
    for mine, theirs in zip(a["table"], one.table):
        if mine["target"] != "latency=0.9":  # what a latency target removes follows the timings
            for key in ("params", "flops", "units_removed"):
                assert mine.get(key) == theirs.get(key), (mine["method"], key)
            assert mine["accuracy"] == theirs["accuracy"]
            assert mine["nll"] == pytest.approx(theirs["nll"], rel=1e-5)


# --- the command under torchrun --------------------------------------------------------------------------


@pytest.mark.slow  # two torchrun processes and one more: about 30-60 s on a busy 2-core machine
def test_compress_under_torchrun_writes_one_report_of_the_one_process_result(tmp_path):
    from pyrozoo import data as datasets
    from pyrozoo.nets import NETS, create_net

    torch.manual_seed(0)
    d = datasets.prepare(datasets.load("fashion-mnist-mini"), pad_to=NETS["lenet"].pad_to)
    net = create_net("lenet", in_channels=1, image_size=d.x_train.shape[-1], num_classes=10)
    finetune(net, d.x_train, d.y_train, 20, 1e-3, 64, 0)
    torch.save(net.state_dict(), tmp_path / "lenet.pt")
    argv = [
        "compress", "lenet", "--weights", "lenet.pt", "--data", "fashion-mnist-mini", "--target", "params=0.5",
        "--finetune-steps", "10", "--fit-size", "200", "--baselines", "tp-l1", "--repeats", "1", "--no-progress",
        "--calibrate", "200",  # each rank fits every net's temperature alike
    ]  # fmt: skip
    two = torchrun(*argv, "--out", "two", cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("| pyrozoo | params=0.5 |") == 1 and two.stdout.count("written to two") == 1
    assert two.stderr.count("pyrozoo removed") == 1  # rank 0 alone logs
    one = one_process(*argv, "--out", "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert sorted(p.name for p in (tmp_path / "two").rglob("*")) == sorted(
        p.name for p in (tmp_path / "one").rglob("*")
    )
    reports = [json.loads((tmp_path / name / "report.json").read_text()) for name in ("one", "two")]
    assert (reports[0]["processes"], reports[1]["processes"]) == (1, 2)
    # float32 sums in another order (two half-batch means, not one mean): weights apart by ~1e-7 (4e-8 measured),
    # so no test prediction flips unless its top two logits are that close: the same accuracy, NLL to 1e-5
    for a, b in zip(*(r["table"] for r in reports)):
        for key in ("method", "params", "units_removed"):
            assert a.get(key) == b.get(key), key
        assert a["accuracy"] == b["accuracy"]
        assert a["nll"] == pytest.approx(b["nll"], rel=1e-5) and a["ece"] == pytest.approx(b["ece"], abs=1e-5)
        assert a["temperature"] == pytest.approx(b["temperature"], rel=1e-5)
    nets = [torch.load(tmp_path / name / "nets/params-0.5/state_dict.pt") for name in ("one", "two")]
    _assert_same(nets[0], nets[1], 1e-5)
