"""Where a step's time goes: the thread's CPU time (``time.thread_time``, which a loaded machine's other jobs do
not enter) of the forward pass (sampling and KL included), the backward pass and the optimiser, for pyrozoo's
mean-field SVI step (``negative_elbo``, the run's optimiser), bayesian-torch's with its KL summed, a plain Adam
step (torch's default, unfused on the CPU, and fused) and, on nets without deterministic layers, pyrozoo's IVON
step (its weight draw timed apart, ``draw``; the optimiser's phase is the gradient's collection, the update and
the Hessian handed to the posterior), called in a shuffled order each round; median over the rounds after 5
warm-up ones. At ``--batch 2``
the net's arithmetic is small and what is left is each step's fixed cost (Python, small kernels).

    python benchmarks/step_phases.py [--nets lenet mlp bn_cnn] [--batch 120] [--rounds 60]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import pyro
import torch
import torch.nn.functional as F

from pyrozoo.elbo import negative_elbo
from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.models.priors import gaussian
from pyrozoo.nets import NETS, create_net
from pyrozoo.steps import STEPS

from bn_cnn import bn_cnn  # benchmarks/ is on the path when run as a script
from peers import bayesian_torch

DATASET_SIZE, CLASSES = 60_000, 10


def phased(forward, optimizer):
    """A step as ``(draw, forward, backward, optimiser)`` CPU seconds (no draw of its own: 0); ``forward()``
    returns the loss."""

    def step():
        start = time.thread_time()
        loss = forward()
        forwarded = time.thread_time()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward = time.thread_time()
        optimizer.step()
        return 0.0, forwarded - start, backward - forwarded, time.thread_time() - backward

    return step


def ivon_phased(model, guide, optimizer, x, y):
    """:func:`pyrozoo.guides.ivon.ivon_step` (one draw) cut into phases: ``(draw, forward, backward,
    optimiser)`` CPU seconds."""

    def step():
        start = time.thread_time()
        means, noise = optimizer._sample_params()
        drawn = time.thread_time()
        optimizer.zero_grad(set_to_none=True)
        nll = -model.likelihood.log_likelihood(model.logits(x, guide.masked_weights(model)), y).mean()
        forwarded = time.thread_time()
        nll.backward()
        backward = time.thread_time()
        optimizer._restore_param_average(True, means, noise)
        optimizer.step()
        guide.pull_state()
        return drawn - start, forwarded - drawn, backward - forwarded, time.thread_time() - backward

    return step


def contenders(name: str, batch: int) -> dict:
    """Each contender's phased step on a random batch of net ``name``."""
    side = 32 if name == "bn_cnn" else NETS[name].pad_to or 28

    def fresh():
        if name == "bn_cnn":
            return bn_cnn(1, CLASSES)
        return create_net(name, in_channels=1, image_size=side, num_classes=CLASSES)

    x, y = torch.randn(batch, 1, side, side), torch.randint(0, CLASSES, (batch,))
    model = BayesianModel(fresh())
    guide = make_guide("meanfield", model)
    net, fused_net = fresh(), fresh()
    calls = {
        "pyrozoo svi, meanfield": phased(
            lambda: negative_elbo(model, guide, x, y, DATASET_SIZE),
            STEPS["svi"].optimizer(model, guide, 1e-3, "adam", DATASET_SIZE),
        ),
        "plain Adam": phased(lambda: F.cross_entropy(net(x), y), torch.optim.Adam(net.parameters(), lr=1e-3)),
        "plain Adam, fused": phased(
            lambda: F.cross_entropy(fused_net(x), y), torch.optim.Adam(fused_net.parameters(), lr=1e-3, fused=True)
        ),
    }
    if not model.deterministic_parameters():  # IVON trains only random layers (no BatchNorm)
        ivon_model = BayesianModel(fresh(), prior=gaussian)
        ivon_guide = make_guide("ivon", ivon_model)
        ivon_optimizer = ivon_guide.make_optimizer(lr=0.1, dataset_size=DATASET_SIZE)
        calls["pyrozoo ivon"] = ivon_phased(ivon_model, ivon_guide, ivon_optimizer, x, y)
    peer = bayesian_torch(fresh(), DATASET_SIZE, 1e-3, summed=True)
    if peer is not None:
        calls[peer.name] = phased(lambda: peer.loss(x, y), peer.optimizer)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", default=["lenet", "mlp", "bn_cnn"])
    parser.add_argument("--batch", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    order = random.Random(0)
    for name in args.nets:
        calls = contenders(name, args.batch)
        times = {key: [] for key in calls}
        with pyro.validation_enabled(False):
            for round_ in range(args.rounds + 5):
                keys = list(calls)
                order.shuffle(keys)
                for key in keys:
                    phases = calls[key]()
                    if round_ >= 5:
                        times[key].append(phases)
        print(f"{name}, batch {args.batch}, {args.rounds} rounds: CPU ms, median")
        for key, rows in times.items():
            draw, forward, backward, optimizer = (statistics.median(column) * 1e3 for column in zip(*rows))
            total = statistics.median(sum(row) for row in rows) * 1e3
            print(
                f"  {key:40s} draw {draw:6.2f}  forward {forward:7.2f}  backward {backward:7.2f}"
                f"  optimiser {optimizer:6.2f}  step {total:7.2f}"
            )


if __name__ == "__main__":
    main()
