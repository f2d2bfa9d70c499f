"""Where an IVON step's time goes on the MLP (batch 120, one thread by default), against a plain Adam step.

Prints, per step, the profiled time of each part: ivon-opt's own (drawing the weights, collecting the gradient,
the update) and pyrozoo's (forward and loss, backward, handing the Hessian to the posterior), next to the plain
step's parts; then the step times, round-robin in a shuffled order in one process (step_time's timer), as ratios
to the plain Adam step's in the same round, median [IQR], of the plain Adam step, pyrozoo's IVON step, and
the IVON step as pyrozoo took it before 2026-11-30 (every layer multiplied by its mask even with nothing pruned,
the Hessian copied into the posterior after each step), so the wrapper's saving is a ratio within one run.

    python benchmarks/ivon_profile.py [--threads 1] [--repeats 60] [--profile-steps 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))
from step_time import BATCH, CLASSES, DATASET_SIZE, print_ratios, timed  # noqa: E402

from pyrozoo.guides import make_guide  # noqa: E402
from pyrozoo.guides.ivon import ivon_step  # noqa: E402
from pyrozoo.models import BayesianModel  # noqa: E402
from pyrozoo.models.priors import gaussian  # noqa: E402
from pyrozoo.nets import create_net  # noqa: E402


class _Before:
    """The two wrapper costs removed on 2026-11-30, put back on a guide (same maths, same numbers)."""

    def __init__(self, guide):
        self.guide = guide

    def masked_weights(self, model):
        return {
            layer.name: self.guide.weights[key] * model.mask(layer.name)
            for key, layer in self.guide._sites.values()
        }

    @torch.no_grad()
    def pull_state(self):
        for group, (key, _) in self.guide._groups():
            hess = self.guide.hess.get_buffer(key)
            if hess.data_ptr() == group["hess"].data_ptr():  # a view left by the new pull: own a copy again
                self.guide.hess.register_buffer(key, hess.clone())
            self.guide.hess.get_buffer(key).copy_(group["hess"].view_as(hess))

    def __getattr__(self, name):
        return getattr(self.guide, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--profile-steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = torch.randn(BATCH, 1, 28, 28), torch.randint(0, CLASSES, (BATCH,))
    net = create_net("mlp", in_channels=1, image_size=28, num_classes=CLASSES)
    adam = torch.optim.Adam(net.parameters(), lr=1e-3)

    def ivon_setup():
        model = BayesianModel(
            create_net("mlp", in_channels=1, image_size=28, num_classes=CLASSES), prior=gaussian
        )
        guide = make_guide("ivon", model)
        return model, guide, guide.make_optimizer(lr=0.1, dataset_size=DATASET_SIZE)

    model, guide, optimizer = ivon_setup()

    def plain_parts():
        with record_function("plain: forward + loss"):
            loss = F.cross_entropy(net(x), y)
        adam.zero_grad(set_to_none=True)
        with record_function("plain: backward"):
            loss.backward()
        with record_function("plain: Adam update"):
            adam.step()

    def ivon_parts():
        with record_function("ivon-opt: draw weights (_sample_params)"):
            average, noise = optimizer._sample_params()
        optimizer.zero_grad(set_to_none=True)
        with record_function("pyrozoo: forward + loss"):
            nll = -model.likelihood.log_likelihood(model.logits(x, guide.masked_weights(model)), y).mean()
        with record_function("pyrozoo: backward"):
            nll.backward()
        with record_function("ivon-opt: collect gradient (_restore_param_average)"):
            optimizer._restore_param_average(True, average, noise)
        with record_function("ivon-opt: update (step)"):
            optimizer.step()
        with record_function("pyrozoo: pull_state"):
            guide.pull_state()

    for _ in range(3):
        plain_parts(), ivon_parts()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            plain_parts(), ivon_parts()
    print(
        f"# MLP, batch {BATCH}, {torch.get_num_threads()} thread(s); profiled ms per step ({args.profile_steps} steps)"
    )
    events = {e.key: e for e in prof.key_averages()}
    for key in sorted(k for k in events if k.startswith(("plain:", "ivon-opt:", "pyrozoo:"))):
        print(f"{key:55s} {events[key].cpu_time_total / args.profile_steps / 1e3:8.2f}")
    print("# busiest operators (self time, ms per step, both steps together)")
    ops = sorted(
        (e for e in events.values() if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total
    )
    for e in ops[:10]:
        print(f"{e.key:55s} {e.self_cpu_time_total / args.profile_steps / 1e3:8.2f}")

    old_model, old_guide, old_optimizer = ivon_setup()
    before = _Before(old_guide)

    def plain_step():
        loss = F.cross_entropy(net(x), y)
        adam.zero_grad(set_to_none=True)
        loss.backward()
        adam.step()

    times = timed(
        {
            "plain": plain_step,
            "ivon": lambda: ivon_step(model, guide, optimizer, x, y, DATASET_SIZE),
            "ivon before": lambda: ivon_step(old_model, before, old_optimizer, x, y, DATASET_SIZE),
        },
        args.repeats,
        warmup=5,
    )
    print_ratios("MLP step", times, {"plain Adam step": "plain"})


if __name__ == "__main__":
    main()
