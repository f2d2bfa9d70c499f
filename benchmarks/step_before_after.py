"""Our mean-field SVI step now against the same step at an earlier commit, measured side by side in one process.

The ELBO (``pyrozoo/elbo.py``), the mean-field guide (``pyrozoo/guides/meanfield.py``) and the Bayesian model
(``pyrozoo/models/bayesian.py``) are loaded as they were at ``--before`` (read with ``git show``) beside the
current ones; the net, the prior and Adam are shared code. Candidates are timed round-robin in a shuffled
order (step_time's timer), with a plain PyTorch step of the deterministic net and the step before as the bases of
the ratios, paired per round.

    python benchmarks/step_before_after.py --before main [--nets mlp lenet] [--repeats 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from pyrozoo.guides import make_guide
from pyrozoo.models import BayesianModel
from pyrozoo.nets import NETS, create_net
from pyrozoo.steps import svi_step

from step_time import BATCH, CLASSES, DATASET_SIZE, adam_step, print_ratios, print_set_up, timed

FILES = {
    "elbo": "pyrozoo/elbo.py",
    "meanfield": "pyrozoo/guides/meanfield.py",
    "bayesian": "pyrozoo/models/bayesian.py",
}


def load_before(revision: str, folder: Path) -> dict:
    """The modules of FILES as they were at ``revision``, each loaded under a name of its own."""
    root = Path(__file__).resolve().parent.parent
    modules = {}
    for key, path in FILES.items():
        text = subprocess.run(
            ["git", "show", f"{revision}:{path}"], cwd=root, check=True, capture_output=True, text=True
        ).stdout
        file = folder / f"before_{key}.py"
        file.write_text(text)
        spec = importlib.util.spec_from_file_location(f"before_{key}", file)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules[key] = module
    return modules


def bench_net(name: str, before: dict, repeats: int, warmup: int) -> None:
    side = NETS[name].pad_to or 28
    x, y = torch.randn(BATCH, 1, side, side), torch.randint(0, CLASSES, (BATCH,))

    def fresh():
        return create_net(name, in_channels=1, image_size=side, num_classes=CLASSES)

    plain = adam_step(fresh(), x, y)

    old_model = before["bayesian"].BayesianModel(fresh())
    old_guide = before["meanfield"].MeanFieldNormal(old_model)
    old_optimizer = torch.optim.Adam(old_guide.parameters(), lr=1e-3)

    def old():
        loss = before["elbo"].negative_elbo(old_model, old_guide, x, y, DATASET_SIZE)
        old_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        old_optimizer.step()

    new_model = BayesianModel(fresh())
    new_guide = make_guide("meanfield", new_model)
    new_optimizer = torch.optim.Adam(new_guide.parameters(), lr=1e-3)
    steps = {
        "plain pytorch (deterministic)": plain,
        "mean-field step before": old,
        "mean-field step now": lambda: svi_step(new_model, new_guide, new_optimizer, x, y, DATASET_SIZE),
    }
    bases = {"plain": "plain pytorch (deterministic)", "before": "mean-field step before"}
    print_ratios(name, timed(steps, repeats, warmup), bases)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--before", default="main", help="the git revision to compare against")
    parser.add_argument("--nets", nargs="+", default=["mlp", "lenet"])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps of each candidate first")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args()
    print_set_up(args.threads, before=f"before = {args.before}, ")
    with tempfile.TemporaryDirectory() as folder:
        before = load_before(args.before, Path(folder))
        for name in args.nets:
            bench_net(name, before, args.repeats, args.warmup)


if __name__ == "__main__":
    main()
