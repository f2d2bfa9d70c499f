"""The forced-prune check on many nets: do channels that BMR must remove leave the rebuilt net?

For each net: half the output channels of its first four prunable layers are put at the prior's point, BMR
(per weight, then units) runs, and the rebuilt net must be smaller, compute the Bayesian model's outputs to
1e-5, predict the same classes and go through ``torch.export`` (:mod:`pyrozoo.bmr.forced`). BatchNorm layers get
the statistics of a trained net first. Every net runs in its own process, under a time limit.

    python benchmarks/forced_prune.py                       # the 4-conv BatchNorm CNN (bn-cnn)
    python benchmarks/forced_prune.py --torchvision         # every torchvision classifier that fits
    python benchmarks/forced_prune.py --timm                # timm's resnet, efficientnet, convnext, vit nets
    python benchmarks/forced_prune.py tv:resnet18 timm:convnext_atto bn-cnn --json out.json
    python benchmarks/forced_prune.py hf:bert-tiny          # a tiny Hugging Face BERT, half its heads forced

A net is tried at 32x32 input with no pretrained weights and 10 classes (``pyrozoo.bmr.forced.prepare``); nets
over ``--max-params`` parameters are skipped, and nets that do not run at 32x32 are counted apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from torch import nn


class BatchNormCNN(nn.Module):
    """The BatchNorm CNN of benchmarks/bn_cnn.py: four 3x3 convs of 32-64-128-128 channels, each with BatchNorm,
    ReLU and max-pooling, then Linear 512-128-10 (307,562 parameters for 1-channel 32x32 input)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        layers, channels = [], in_channels
        for width in (32, 64, 128, 128):
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            layers.append(nn.MaxPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(512, 128), nn.ReLU(), nn.Linear(128, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


def check_one(name: str, max_params: float) -> dict:
    import warnings

    from pyrozoo.bmr.forced import forced_prune_check, prepare, tiny_bert

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    options = {}
    if name == "bn-cnn":
        torch.manual_seed(0)
        prepared = BatchNormCNN(), torch.randn(2, 1, 32, 32)
    elif name == "hf:bert-tiny":  # token input, logits under "logits"; its heads forced as well as rows
        prepared, options = tiny_bert(), {"output_key": "logits", "heads": True}
    else:
        prepared = prepare(name, int(max_params))
    if isinstance(prepared, str):
        status = "no-32x32" if prepared.startswith("does not run") else "skipped"
        return {"net": name, "status": status, "why": prepared}
    net, x = prepared
    start = time.perf_counter()
    try:
        found = forced_prune_check(net, x, **options)
    except Exception as e:  # the check's own failure is a finding
        return {"net": name, "status": "error", "why": f"{type(e).__name__}: {str(e)[:200]}"}
    return {
        "net": name,
        "status": "pass" if found.passed else "fail",
        "dense": found.dense,
        "sparse": found.sparse,
        "forced": found.forced,
        "removed": found.removed,
        "heads": f"{found.removed_heads}/{found.forced_heads}",
        "difference": found.difference,
        "same_class": found.same_class,
        "export": found.export,
        "seconds": round(time.perf_counter() - start, 1),
    }


def run(name: str, args) -> dict:
    """One net in its own process (memory and time stay bounded)."""
    command = [sys.executable, __file__, "--one", name, "--max-params", str(args.max_params)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"net": name, "status": "timeout", "why": f"over {args.timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"net": name, "status": "error", "why": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(lines[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "nets", nargs="*", help="bn-cnn, hf:bert-tiny, tv:NAME or timm:NAME (default: bn-cnn)"
    )
    parser.add_argument("--torchvision", action="store_true", help="every torchvision classifier")
    parser.add_argument("--timm", action="store_true", help="timm's nets of pyrozoo.bmr.forced.TIMM_NETS")
    parser.add_argument("--max-params", type=float, default=30e6, help="skip larger nets")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per net")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(check_one(args.one, args.max_params)))
        return
    names = list(args.nets)
    if args.torchvision or args.timm:
        from pyrozoo.bmr.forced import zoo_names

        wanted = ("tv:",) * args.torchvision + ("timm:",) * args.timm
        names += [n for n in zoo_names() if n.startswith(wanted)]
    rows = []
    for name in names or ["bn-cnn"]:
        row = run(name, args)
        rows.append(row)
        detail = (
            f"{row['dense']:,} -> {row['sparse']:,} parameters, {row['removed']}/{row['forced']} forced channels "
            f"gone{', ' + row['heads'] + ' forced heads gone' if row['heads'] != '0/0' else ''}, "
            f"difference {row['difference']:.1e}, same class {row['same_class']}, "
            f"export {'ok' if not row['export'] else row['export'][:60]}, {row['seconds']} s"
            if "dense" in row
            else row.get("why", "")
        )
        print(f"{row['net']:32s} {row['status']:8s} {detail}", flush=True)
    tried = [r for r in rows if r["status"] not in ("skipped", "no-32x32")]
    print(f"passed {sum(r['status'] == 'pass' for r in tried)} of {len(tried)} nets checked "
          f"({sum(r['status'] == 'skipped' for r in rows)} skipped as too large, "
          f"{sum(r['status'] == 'no-32x32' for r in rows)} do not run at 32x32)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
