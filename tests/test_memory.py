"""Memory of a large net's Bayesian model and compression (issue 28, item 5; benchmarks/memory.py measures
vgg11_bn): no copy of the trained net beyond those the methods need, the Laplace diagonal's float64 sums
made in place with the same numbers as written out of place, and nothing a rebuild traced left for Python's cyclic
collector."""

from __future__ import annotations

import gc
import math
import weakref

import torch
from torch import nn

from pyrozoo.bmr import units as units_module
from pyrozoo.bmr.rebuild import parameter_count, rebuild
from pyrozoo.compress import compress, rank_units, remove_first
from pyrozoo.posteriors import laplace as laplace_module


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip


def test_compress_reads_the_given_net_without_copying_or_changing_it(monkeypatch):
    net = _cnn().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fitted = []
    real = laplace_module.laplace

    def spy(dense, *args, **kwargs):
        fitted.append(dense)
        return real(dense, *args, **kwargs)

    monkeypatch.setattr(laplace_module, "laplace", spy)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    compress(
        net, (x, y, x[:32], y[:32]), "params=0.7", finetune_steps=1, baselines=(), repeats=1, progress=False,
        log=lambda text: None,
    )  # fmt: skip
    assert fitted and fitted[0] is net  # the Laplace fit (which copies it once) got the net itself
    assert net.training
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_the_laplace_evidence_in_place_is_the_written_out_formula():
    """prior_precision and log_marginal_likelihood work in scratch buffers, not on a copy per step; their
    numbers are those of the out-of-place formulas, bit for bit, and the eigenvalues are left as they were."""
    torch.manual_seed(1)
    h = torch.rand(50, 7, dtype=torch.float64) * 10
    kept = h.clone()
    squared = float(torch.randn(50, 7, dtype=torch.float64).square().sum())
    delta = laplace_module.prior_precision(h, squared)
    flat = h.flatten()
    excess = float((flat / (flat + delta)).sum()) - delta * squared
    assert abs(excess) < 1e-6 * squared * delta
    written = -0.5 * delta * squared + 0.5 * h.numel() * math.log(delta) - 0.5 * float((flat + delta).log().sum())
    assert laplace_module.log_marginal_likelihood(h, squared, delta) == written
    assert torch.equal(h, kept)


def test_rebuilds_leave_nothing_they_traced_for_the_cyclic_collector(monkeypatch):
    """Torch-Pruning's graphs are webs of reference cycles holding the traced net (the structure's copy, or a
    rebuild's copy before its cut, whose replaced weights were a large net's whole weights per rebuild) and the
    traced pass's autograd functions. With Python's cyclic collector off, none of it outlives the rebuild."""
    traced = []
    real = units_module.dependency_graph

    def spy(net, *args, **kwargs):
        graph = real(net, *args, **kwargs)
        traced.extend(weakref.ref(p) for p in [graph, *net.parameters()])
        return graph

    monkeypatch.setattr(units_module, "dependency_graph", spy)
    x = torch.randn(32, 1, 8, 8)
    model, posterior = laplace_module.laplace(_cnn().eval(), x, "diag", progress=False)
    ranking = rank_units(model, posterior, x[:2])
    gc.collect()
    gc.disable()
    try:
        for count in (3, 1):  # each rebuild traces the net it cuts; the first traces the structure too
            remove_first(model, ranking, count)
            net = rebuild(model, posterior)
            assert parameter_count(net) < parameter_count(model.net)  # units were cut
            kept = {id(p) for p in net.parameters()}
            alive = [r() for r in traced if r() is not None and id(r()) not in kept]
            assert traced and not alive
            del net
    finally:
        gc.enable()
