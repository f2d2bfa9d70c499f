"""Time of one BMR pass (dF, spike-and-slab rule, masks, guide reset, pruned fraction) against training time.

For each net: the time of ``pyrozoo.bmr.prune`` over all prunable layers of a mean-field guide (each pass from
the same saved state, its restoring counted), as a ratio to one epoch of 500 SVI steps at batch 120 (500 x the
step's time), the two timed round-robin in a shuffled order (step_time's timer) and paired per round, median
[IQR]; and the median milliseconds per million weights.

    python benchmarks/bmr_time.py [--nets mlp lenet] [--repeats 20] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from pyrozoo.bmr.prune import prune
from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.nets import NETS, create_net
from pyrozoo.steps import svi_step

# the step-time script beside this one (Python puts a script's folder on sys.path)
from pyrozoo.costs import paired_ratios

from step_time import BATCH, CLASSES, DATASET_SIZE, timed  # isort:skip

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
    fresh = copy.deepcopy(model.state_dict()), copy.deepcopy(guide.state_dict())

    def one_pass():  # from the same state each time, so the step after it trains the unpruned posterior
        model.load_state_dict(fresh[0])
        guide.load_state_dict(fresh[1])
        prune(model, guide, "spike-and-slab")
        model.load_state_dict(fresh[0])
        guide.load_state_dict(fresh[1])

    steps = {"step": lambda: svi_step(model, guide, optimizer, x, y, DATASET_SIZE), "bmr": one_pass}
    times = timed(steps, repeats, warmup=1)
    q1, median, q3 = (r / STEPS_PER_EPOCH for r in paired_ratios(times, "step")["bmr"])
    weights = sum(layer.shape.numel() for layer in model.layers if layer.prunable)
    per_million = statistics.median(times["bmr"]) * 1e3 / (weights / 1e6)
    print(
        f"{name:6s} BMR pass over {weights / 1e6:.3f} M weights: {per_million:6.2f} ms per million weights; "
        f"BMR / epoch of {STEPS_PER_EPOCH} steps {median:.4f} [{q1:.4f}-{q3:.4f}]"
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
