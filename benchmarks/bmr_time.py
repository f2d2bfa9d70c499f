"""Time of one BMR pass (dF, spike-and-slab rule, masks, guide reset, pruned fraction) against training time.

For each net: the median time of ``pyrozoo.bmr.prune`` over all prunable layers of a mean-field guide, in
milliseconds and milliseconds per million weights, and as a ratio to one epoch of 500 SVI steps at batch 120
(500 x the median step time measured in the same process).

    python benchmarks/bmr_time.py [--nets mlp lenet] [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse
import copy

import pyro
import torch

from pyrozoo.bmr.prune import prune
from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.nets import NETS, create_net
from pyrozoo.steps import svi_step

# the step-time script beside this one (Python puts a script's folder on sys.path)
from step_time import BATCH, CLASSES, DATASET_SIZE, median_seconds  # isort:skip

STEPS_PER_EPOCH = 500


def bench_net(name: str, repeats: int) -> None:
    side = NETS[name].pad_to or 28
    x, y = torch.randn(BATCH, 1, side, side), torch.randint(0, CLASSES, (BATCH,))
    model = BayesianModel(create_net(name, in_channels=1, image_size=side, num_classes=CLASSES))
    guide = make_guide("meanfield", model)
    with torch.no_grad():  # a posterior where about half the weights look prunable, as mid-training
        for p in guide.locs.values():
            p.mul_(torch.rand_like(p) > 0.5)
    optimizer = torch.optim.Adam(guide.parameters(), lr=1e-2)
    with pyro.validation_enabled(False):
        step = median_seconds(lambda: svi_step(model, guide, optimizer, x, y, DATASET_SIZE), repeats)
    fresh = copy.deepcopy(model.state_dict()), copy.deepcopy(guide.state_dict())

    def one_pass():
        model.load_state_dict(fresh[0])
        guide.load_state_dict(fresh[1])
        return prune(model, guide, "spike-and-slab").seconds

    one_pass()
    seconds = sorted(one_pass() for _ in range(repeats))[repeats // 2]
    weights = sum(layer.shape.numel() for layer in model.layers if layer.prunable)
    epoch = STEPS_PER_EPOCH * step
    print(
        f"{name:6s} BMR pass {seconds * 1e3:7.2f} ms over {weights / 1e6:.3f} M weights = "
        f"{seconds * 1e3 / (weights / 1e6):6.2f} ms per million weights; epoch of {STEPS_PER_EPOCH} steps "
        f"{epoch:6.2f} s; ratio BMR / epoch {seconds / epoch:.4f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", default=["mlp", "lenet"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"# CPU, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for name in args.nets:
        bench_net(name, args.repeats)


if __name__ == "__main__":
    main()
