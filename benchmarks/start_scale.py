"""Where training starts: the initial negative ELBO of a net's Bayesian model on one batch, split into its data
term (``N x`` cross-entropy of one posterior draw) and its KL, next to the plain net's ``N x`` cross-entropy,
for the guide's own start and the start at the net's initialisation (``pyrozoo.init_from.start_from_net``).

    python benchmarks/start_scale.py NET [NET ...] [--batch 16] [--size 60000] [--side 28]
"""

from __future__ import annotations

import argparse
import copy
import time

import pyro
import torch
import torch.nn.functional as F

from pyrozoo.elbo import negative_elbo
from pyrozoo.guides import make_guide
from pyrozoo.init_from import start_from_net
from pyrozoo.models import BayesianModel
from pyrozoo.nets import NETS, create_net


def terms(name: str, start: str, batch: int, size: int, side: int) -> dict:
    pyro.set_rng_seed(0)
    side = NETS[name].pad_to or side
    net = create_net(name, in_channels=1, image_size=side, num_classes=10)
    x, y = torch.randn(batch, 1, side, side), torch.randint(0, 10, (batch,))
    with torch.no_grad():
        plain = size * F.cross_entropy(copy.deepcopy(net).train()(x), y)
    model = BayesianModel(net, example_input=x[:2])
    guide = make_guide("meanfield", model)
    seconds = 0.0
    if start == "net":
        begin = time.perf_counter()
        start_from_net(model, guide)
        seconds = time.perf_counter() - begin
    with torch.no_grad():
        logits = model.logits(x, model.weights_from(guide()))
        data = size * F.cross_entropy(logits, y)
        kl = negative_elbo(model, guide, x, y, size) - data  # a second draw's data term differs a little
    weights = sum(layer.shape.numel() for layer in model.layers)
    return dict(
        net=name, start=start, weights=weights, plain=float(plain), data=float(data), kl=float(kl),
        kl_per_weight=float(kl) / weights, max_logit=float(logits.abs().max()), start_seconds=seconds,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("nets", nargs="+")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=60000, help="N, the training set's size")
    parser.add_argument("--side", type=int, default=28, help="image side for nets that take any")
    parser.add_argument("--starts", nargs="+", default=["guide", "net"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'net':10s} {'start':6s} {'weights':>9s} {'plain NxCE':>11s} {'data term':>10s} {'ratio':>6s} "
          f"{'KL':>9s} {'KL/weight':>9s} {'max|logit|':>10s}")  # fmt: skip
    for name in args.nets:
        for start in args.starts:
            r = terms(name, start, args.batch, args.size, args.side)
            print(
                f"{r['net']:10s} {r['start']:6s} {r['weights']:9d} {r['plain']:11.3g} {r['data']:10.3g} "
                f"{r['data'] / r['plain']:6.2f} {r['kl']:9.3g} {r['kl_per_weight']:9.2f} {r['max_logit']:10.3g}"
            )


if __name__ == "__main__":
    main()
