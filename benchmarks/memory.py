"""Peak resident memory of pyrozoo's Bayesian model of a large net, against the plain net's training (issue 28).

Each case runs in a process of its own (so that one case's peak is not another's), which reports its own peak
RSS (``getrusage``'s ``ru_maxrss``); the parent watches every child's RSS in ``/proc`` and kills one that goes
over ``--limit-gb``, so that a shared machine never runs out of memory; a case's peak is the larger of the
two. The cases:

- ``plain``: the plain net, two Adam steps on a random batch (the first allocates Adam's state);
- ``svi``: pyrozoo's Bayesian model of the same net with the mean-field guide (``flat-ff``), built as
  ``pyrozoo train --init-from WEIGHTS`` builds it (:func:`pyrozoo.build.build`), then two SVI steps;
- ``compress``: ``pyrozoo compress`` of the same weights (the Laplace fit, the ranking, the rebuilt net, its
  fine-tune and report), with a short fine-tune and one baseline.

The weights are the net's own initialisation, saved once by a process of their own (memory does not depend on
what the weights are).

    python benchmarks/memory.py [--net tv:vgg11_bn] [--batch 32] [--cases plain svi compress] [--limit-gb 12]
        [--out /work/bench/NAME/memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DATA = "fashion-mnist-mini"  # 28x28 grey images, padded to the torchvision nets' 32x32
CASES = ("plain", "svi", "compress")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _net(name: str, options: dict):
    from pyrozoo.nets import NETS, create_net

    side = NETS[name].pad_to or 28  # the data's 28x28 images, padded to what the net expects
    return create_net(name, in_channels=1, image_size=side, num_classes=10, **options)


def _watch_where(found: dict) -> None:
    """Sample this process's RSS every 20 ms from a thread, keeping the main thread's pyrozoo call stack at the
    largest: where the peak is."""
    import threading

    main = threading.main_thread().ident

    def sample():
        while True:
            rss = _rss_mb(os.getpid())
            if rss > found.get("rss_mb", 0):
                frame, stack = sys._current_frames().get(main), []
                while frame is not None:
                    code = frame.f_code
                    if "pyrozoo" in code.co_filename or "benchmarks" in code.co_filename:
                        stack.append(f"{Path(code.co_filename).stem}.{code.co_name}:{frame.f_lineno}")
                    frame = frame.f_back
                found.update(rss_mb=round(rss), where=" < ".join(stack[:6]))
                if rss > found.get("told_mb", 0) * 1.05:  # for the parent, should it have to kill this one
                    found["told_mb"] = rss
                    print(f"peak {rss:.0f} MB at {found['where']}", file=sys.stderr, flush=True)
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()


def weights(args) -> None:
    import torch

    torch.manual_seed(0)
    torch.save(_net(args.net, args.options).state_dict(), args.weights)


def plain(args) -> None:
    import torch
    import torch.nn.functional as F

    from pyrozoo.nets import NETS

    torch.manual_seed(0)
    net = _net(args.net, args.options).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    side = NETS[args.net].pad_to or 28
    x, y = torch.randn(args.batch, 1, side, side), torch.randint(0, 10, (args.batch,))
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()


def svi(args) -> None:
    import torch

    from pyrozoo.build import build
    from pyrozoo.config import TrainConfig

    config = TrainConfig(
        net=args.net,
        data=DATA,
        method="flat-ff",
        init_from=str(args.weights),
        batch_size=args.batch,
        net_options=args.options,
    )
    setup = build(config, log=lambda text: None)
    for _ in range(2):
        indices = torch.arange(args.batch)
        setup.step.step(setup.model, setup.guide, setup.optimizer, *setup.batch(indices))


def compress(args) -> None:
    from pyrozoo.cli import main

    code = main(
        [
            "compress", args.net, "--weights", str(args.weights), "--data", DATA, "--target", "params=0.5",
            "--finetune-steps", "2", "--batch-size", str(args.batch), "--fit-size", "64", "--baselines",
            "global-magnitude", "--repeats", "1", "--threads", "1", "--no-progress",
            "--out", str(args.out / "compressed"),
            *[f"--net-option={k}={v}" for k, v in args.options.items()],
        ]
    )  # fmt: skip
    if code:
        raise SystemExit(code)


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def run_case(case: str, args) -> dict:
    """Run ``case`` in a child process, killed if its RSS passes ``--limit-gb``; its peak in MB."""
    command = [sys.executable, __file__, "--child", case, "--net", args.net, "--batch", str(args.batch)]
    command += ["--out", str(args.out), *[f"--net-option={k}={v}" for k, v in args.options.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    watched, killed = 0.0, False
    while child.poll() is None:
        watched = max(watched, _rss_mb(child.pid))
        if watched > args.limit_gb * 1024:
            child.kill()
            killed = True
        time.sleep(0.02)
    out = child.stdout.read()
    result = {"case": case, "watched_mb": round(watched), "seconds": round(time.perf_counter() - start, 1)}
    if killed:
        return {**result, "killed_at_mb": round(watched)}
    if child.returncode != 0:
        return {**result, "failed": child.returncode}
    found = json.loads(out.strip().splitlines()[-1])
    # the kernel's high-water mark can lag the sampled RSS: the peak is at least either
    return {**result, "peak_mb": max(found["peak_mb"], round(watched)), "where": found["where"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--net", default="tv:vgg11_bn")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--limit-gb", type=float, default=12.0, help="kill a case whose RSS passes this")
    parser.add_argument("--out", type=Path, default=Path("/work/bench/memory"))
    parser.add_argument("--net-option", action="append", default=[], help="KEY=VALUE, as pyrozoo train's")
    parser.add_argument("--child", choices=(*CASES, "weights"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from pyrozoo.options import parse_option

    args.options = dict(parse_option(text) for text in args.net_option)
    args.weights = args.out / f"{args.net.replace(':', '-')}.pt"
    if args.child:
        import torch

        torch.set_num_threads(1)
        where: dict = {}
        _watch_where(where)
        {"plain": plain, "svi": svi, "compress": compress, "weights": weights}[args.child](args)
        print(json.dumps({"peak_mb": round(_peak_mb()), "where": where.get("where", "")}))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.weights.is_file():
        made = run_case("weights", args)
        if "peak_mb" not in made:
            raise SystemExit(f"saving the weights failed: {made}")
    print(f"{args.net}, batch {args.batch}, one thread; load {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for case in args.cases:
        rows.append(run_case(case, args))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["peak_mb"] for r in rows if r["case"] == "plain" and "peak_mb" in r), None)
    print("| case | peak RSS (MB) | ratio to plain | seconds |")
    print("|---|---|---|---|")
    for r in rows:
        peak = r.get("peak_mb")
        shown = f"{peak:,}" if peak is not None else f"killed at {r.get('killed_at_mb', '?')} / failed"
        ratio = f"{peak / base:.2f}" if peak is not None and base else "-"
        print(f"| {r['case']} | {shown} | {ratio} | {r['seconds']} |")


if __name__ == "__main__":
    main()
