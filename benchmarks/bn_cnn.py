"""A BatchNorm CNN and its dense training: four 3x3 convolutions of 32-64-128-128 channels (no
bias: BatchNorm holds the shift), each followed by BatchNorm, ReLU and 2x2 max-pooling, then Linear 512-128-10
(307,562 parameters at 32x32 input), trained with plain Adam (lr 1e-3, batch 128) on Fashion-MNIST padded to
32x32, as pyrozoo prepares it. ``--net`` trains any other net ``pyrozoo compress`` takes the same way
(a pyrozoo net such as resnet20, ``tv:NAME``, ``timm:NAME``, ``package.module:factory``).

    python benchmarks/bn_cnn.py --epochs 2 --out bn_cnn.pt          # the trained state_dict
    PYTHONPATH=benchmarks pyrozoo compress bn_cnn:bn_cnn --weights bn_cnn.pt --pad-to 32 --target latency=0.5
    python benchmarks/bn_cnn.py --net resnet20 --epochs 2 --out resnet20.pt
    python benchmarks/bn_cnn.py --net resnet20 --epochs 1 --resume resnet20.pt --out resnet20-e3.pt  # one more epoch
    pyrozoo compress resnet20 --weights resnet20.pt --pad-to 32 --target latency=0.5   # trained at 32x32, as here

The factory takes the data's ``in_channels`` and ``num_classes``, as ``pyrozoo compress`` passes them.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn


def bn_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width_in, width_out in zip((in_channels, 32, 64, 128), (32, 64, 128, 128)):
        layers += [
            nn.Conv2d(width_in, width_out, 3, padding=1, bias=False),  # BatchNorm holds the shift
            nn.BatchNorm2d(width_out),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
    return nn.Sequential(
        *layers, nn.Flatten(), nn.Linear(128 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, num_classes)
    )


def main() -> None:
    from pyrozoo import data as datasets
    from pyrozoo.baselines import finetune
    from pyrozoo.compress import build_net
    from pyrozoo.metrics import evaluate_net

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--net", default="bn_cnn", help="bn_cnn (this file's), or any net compress takes")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--data-dir", default=None, help="folder holding the data set's files")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bn_cnn.pt")
    parser.add_argument("--resume", default=None, help="a state_dict this script wrote: train it on (fresh Adam)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    d = datasets.prepare(datasets.load(args.data, args.data_dir), pad_to=32)
    net = bn_cnn(d.x_train.shape[1], d.num_classes) if args.net == "bn_cnn" else build_net(args.net, d)
    if args.resume:
        from pyrozoo.init_from import load_state, trained_net

        net = trained_net(net, load_state(args.resume, flag="--resume"), what=f"--resume {args.resume}")
    steps = round(args.epochs * len(d.x_train) / args.batch_size)
    start = time.perf_counter()
    to = args.device
    finetune(net.to(to), d.x_train.to(to), d.y_train.to(to), steps, 1e-3, args.batch_size, args.seed)
    metrics = evaluate_net(net, d.x_test.to(to), d.y_test.to(to), d.num_classes)
    print(
        f"{args.net}: {sum(p.numel() for p in net.parameters()):,} parameters, {steps} Adam steps in "
        f"{time.perf_counter() - start:.0f} s, test accuracy {metrics['accuracy']:.4f}, NLL {metrics['nll']:.4f}, "
        f"ECE {metrics['ece']:.4f}"
    )
    torch.save(net.cpu().state_dict(), args.out)


if __name__ == "__main__":
    main()
