"""Issue 33, items 6 and 7: evaluation memory that does not grow with --samples, and the faults a careless or
hostile user meets: a full disk, a read-only folder, data that cannot train, a wrong --data-dir, duplicated
columns, corrupt run files for every subcommand that reads them, and refused commands that change no file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pyrozoo import metrics

ROOT = Path(__file__).resolve().parents[1]


# --- item 6: evaluation memory --------------------------------------------------------------------------------

UNDER_A_LIMIT = """
import resource, torch
torch.set_num_threads(1)
from pyrozoo.metrics import evaluate_draws
S, N, C = {samples}, 10_000, 2
x = torch.arange(N)
y = x % 2
lp = torch.log_softmax(torch.stack([x * 0.0, x * 1e-4], 1).double(), -1)
size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (128 << 20), resource.RLIM_INFINITY))
got = evaluate_draws([lambda idx: lp[idx]] * S, x, y, C, S, batch_size=N)
want = -lp[x, y].mean().item()  # every draw the same: NLL is the cross-entropy, LPD its negative
assert abs(got["nll"] - want) < 1e-9 and abs(got["lpd"] + want) < 1e-9, (got, want)
print("ok")
"""


def test_evaluation_memory_does_not_grow_with_samples():
    """6000 draws over 10,000 points under 128 MB more address space than the process had: keeping a
    (sample, point) matrix would need 540 MB, the accumulator keeps per-point sums only."""
    script = UNDER_A_LIMIT.format(samples=6000)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_points_per_chunk_bounds_the_draws_held():
    for samples in (1, 100, 10_000, 10**7):
        chunk = metrics.points_per_chunk(samples, 50_000)
        assert chunk >= 1 and (chunk == 1 or chunk * samples <= metrics.POINT_DRAWS_AT_ONCE)
    assert metrics.points_per_chunk(100, 500) == 500  # a small test set is one chunk: the draws are not replayed


def test_regression_evaluation_and_predict_in_chunks_are_the_whole(tmp_path, monkeypatch):
    """Chunks of 7 points, each replaying the draws: the metrics and predictions of one chunk of all points."""
    from pyrozoo.predict import predict
    from pyrozoo.train import Run
    from test_regression import quiet, tiny_regression

    run = Run(tiny_regression("flat-ff", epochs=1), tmp_path, log=quiet)
    run.train(progress=False)
    whole = run.evaluate()
    x = run.data.x_test
    kwargs = dict(samples=run.config.samples, seed=3, y=run.data.y_test)
    predicted = predict(run.model, run.guide, x, **kwargs)
    monkeypatch.setattr(metrics, "POINT_DRAWS_AT_ONCE", 7 * run.config.samples)
    assert len(x) > 7
    chunked = run.evaluate()
    # the same draws: only the net's float32 rounding on another batch shape differs
    assert chunked == pytest.approx(whole, rel=1e-6, abs=1e-9)
    again = predict(run.model, run.guide, x, **kwargs)
    assert predicted.keys() == again.keys()
    for key in predicted:
        torch.testing.assert_close(again[key], predicted[key], rtol=1e-5, atol=1e-7, msg=key)
