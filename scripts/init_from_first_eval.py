"""Start methods from a finished run's trained net (``--init-from``) and report their first evaluation.

    python scripts/init_from_first_eval.py RUN_FOLDER --methods bmr-th tiered-ff ivon-bmr --out /tmp/init-from

The run's net (posterior mean, nothing removed) is saved as a ``state_dict``; each method is built on the same
net and data with ``init_from`` that file, and evaluated before any training: its accuracy should be the trained
net's. Also prints the largest difference of the logits at the posterior mean from the trained net's.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from pyrozoo.bmr.rebuild import rebuild
from pyrozoo.metrics import evaluate_net
from pyrozoo.config import TrainConfig
from pyrozoo.train import Run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "run", help="a finished run folder (e.g. a flat-map run); opened read-only from a copy"
    )
    parser.add_argument("--methods", nargs="+", default=["bmr-th", "tiered-ff", "ivon-bmr"])
    parser.add_argument(
        "--out", default="/tmp/init-from", help="scratch folder for the copy and the new runs"
    )
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    copy = out / "source"
    copy.mkdir(parents=True)
    for name in ("config.json", "checkpoint.pt"):  # a copy: the source may still be training
        shutil.copy(Path(args.run) / name, copy / name)
    source = Run.open(copy, log=print)
    net = rebuild(source.model, source.guide, remove_dead=False)
    weights = out / "net.pt"
    torch.save(net.state_dict(), weights)
    d = source.data
    print(
        f"source epoch {source.epoch}",
        {k: round(v, 4) for k, v in evaluate_net(net, d.x_test, d.y_test, d.num_classes).items()},
    )
    config = source.config
    source.close()
    for method in args.methods:
        start = time.perf_counter()
        run = Run(
            TrainConfig(
                net=config.net,
                data=config.data,
                method=method,
                net_options=config.net_options,
                init_from=str(weights),
            ),
            out / method,
            log=print,
        )
        built = time.perf_counter() - start
        x = d.x_test[:2000]
        with torch.no_grad():
            diff = (rebuild(run.model, run.guide, remove_dead=False)(x) - net(x)).abs().max().item()
        start = time.perf_counter()
        metrics = run.evaluate()
        print(
            f"{method}: built in {built:.1f} s, max |logit difference| at the posterior mean {diff:.2e}, first "
            f"evaluation ({run.config.samples} samples, {time.perf_counter() - start:.0f} s):",
            {k: round(v, 4) for k, v in metrics.items()},
            flush=True,
        )
        run.close()


if __name__ == "__main__":
    main()
