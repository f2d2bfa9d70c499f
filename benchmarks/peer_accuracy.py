"""Accuracy on the same budget: pyrozoo's mean-field run (``flat-ff``) from each start beside the peers of
``benchmarks/peers.py``, every one at the same learning rate, batch and number of steps, on the same data and
seed, evaluated on the whole test set with the same metrics (``pyrozoo.metrics``: accuracy, NLL, ECE over
``--samples`` posterior draws) after each of ``--at`` steps.

pyrozoo trains through ``pyrozoo.train.Run`` (as ``pyrozoo train`` does; epochs of ``--at``'s greatest common
divisor steps, evaluated at each step in ``--at``); the peers train on pyrozoo's prepared data (standardised,
padded to the net's input side) in minibatches drawn as pyrozoo draws them (``pyrozoo.data.Minibatches``).
A peer draws new weights at every forward pass, so each evaluation pass over the test set is one posterior draw.

    python benchmarks/peer_accuracy.py [--net lenet] [--steps-at 1000 3000] [--lr 1e-3] [--seeds 0 1]
        [--lr-units weight] [--samples 20] [--contenders pyrozoo:net pyrozoo:guide bayesian-torch-summed ...]
        [--out DIR]

Prints one line per contender, seed and step, and appends it as JSON to ``DIR/accuracy.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from functools import reduce
from pathlib import Path

import torch

from pyrozoo import data as datasets
from pyrozoo.config import TrainConfig
from pyrozoo.metrics import evaluate_draws
from pyrozoo.nets import NETS, create_net
from pyrozoo.train import Run

from peers import peers  # benchmarks/ is on the path when run as a script

PEERS = {  # contender name -> the peer's name in benchmarks/peers.py
    "bayesian-torch-summed": "bayesian-torch, KL summed (true ELBO)",
    "bayesian-torch-averaged": "bayesian-torch, KL averaged (shipped)",
    "tyxe": "TyXe",
    "pyro": "plain Pyro",
}
METRICS = ("accuracy", "nll", "ece")


def pyrozoo_run(start: str, args, seed: int, out: Path) -> dict[int, dict]:
    """{step: metrics} of a flat-ff run from ``start`` (net or guide)."""
    every = reduce(math.gcd, args.steps_at)
    config = TrainConfig(
        net=args.net, method="flat-ff", data=args.data, start=start, lr=args.lr, lr_units=args.lr_units,
        batch_size=args.batch_size,
        epochs=max(args.steps_at) // every, steps_per_epoch=every, eval_every=1, samples=args.samples, seed=seed,
    )  # fmt: skip
    with Run(config, out / f"pyrozoo-{start}-s{seed}", log=lambda text: None) as run:
        table = run.train(progress=False)
    rows = {int(epoch) * every: row for epoch, row in table.set_index("epoch").iterrows()}
    return {step: {k: float(rows[step][k]) for k in METRICS} for step in args.steps_at}


def peer_run(name: str, args, seed: int, prepared) -> dict[int, dict]:
    """{step: metrics} of the peer ``name`` trained on ``prepared`` data."""
    torch.manual_seed(seed)
    net = create_net(
        args.net, in_channels=prepared.x_train.shape[1], image_size=prepared.x_train.shape[-1],
        num_classes=prepared.num_classes,
    )  # fmt: skip
    built = {peer.name: peer for peer in peers(net, len(prepared.x_train), args.lr)[0]}
    if PEERS[name] not in built:
        raise SystemExit(f"{name} is not installed (pip install -e '.[bench]')")
    peer = built[PEERS[name]]
    batches = datasets.Minibatches(len(prepared.x_train), args.batch_size, seed)
    found = {}
    for step in range(1, max(args.steps_at) + 1):
        index = batches.next()
        peer.step(prepared.x_train[index], prepared.y_train[index])
        if step in args.steps_at:
            x, y = prepared.x_test, prepared.y_test
            with torch.no_grad():
                metrics = evaluate_draws(
                    [peer.log_probs] * args.samples, x, y, prepared.num_classes, args.samples, len(x)
                )
            found[step] = {k: metrics[k] for k in METRICS}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--net", default="lenet")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--steps-at", type=int, nargs="+", default=[1000, 3000])
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--lr-units",
        choices=["weight", "latent"],
        help="what pyrozoo's lr measures (default: flat-ff's, weight)",
    )
    parser.add_argument("--batch-size", type=int, default=120)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument(
        "--contenders", nargs="+", default=["pyrozoo:net", "pyrozoo:guide", *PEERS], help=", ".join(PEERS)
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("peer-accuracy"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    prepared = datasets.prepare(datasets.load(args.data), pad_to=NETS[args.net].pad_to)
    for seed in args.seeds:
        for name in args.contenders:
            start = time.perf_counter()
            if name.startswith("pyrozoo:"):
                found = pyrozoo_run(name.partition(":")[2], args, seed, args.out)
            else:
                found = peer_run(name, args, seed, prepared)
            seconds = time.perf_counter() - start
            for step, metrics in found.items():
                row = {
                    "contender": name,
                    "net": args.net,
                    "seed": seed,
                    "step": step,
                    "lr": args.lr,
                    "lr_units": args.lr_units if name.startswith("pyrozoo:") else None,
                    **metrics,
                }
                print(
                    f"{name:24s} seed {seed} step {step:5d}: accuracy {metrics['accuracy']:.4f} NLL "
                    f"{metrics['nll']:.3f} ECE {metrics['ece']:.3f}   ({seconds:.0f} s)",
                    flush=True,
                )
                with open(args.out / "accuracy.jsonl", "a") as f:
                    f.write(json.dumps({**row, "seconds": round(seconds)}) + "\n")


if __name__ == "__main__":
    main()
