"""Turn a log of the reference code's run (experiments/reference/README.md: how it was run) into a per-epoch
CSV.

    python scripts/reference_log_to_csv.py RUN.log OUT.csv

The patched reference prints one line per epoch, ``REFRUN {json}``, flushed as it goes; tqdm may share the
line, so the record is looked for anywhere in it. The CSV has the columns of
experiments/reference/reference-lenet-bmr-ss-seed137.csv:
epoch, pruned_fraction, accuracy, ece, nll, avg_loss, pruned_layerK for every layer, then zeta_after_layerK and
df_pos_layerK for every pruned layer (all but the last). Metrics of an epoch that was not evaluated are nan; the
last epoch has no pruning pass after it, so its zeta and df_pos are empty. A partial log (a run still going)
gives the epochs done so far; a resumed run's log repeats no epoch, but if it did the last record wins.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
from pathlib import Path

from pyrozoo.io import atomic_write_text

RECORD = re.compile(r"REFRUN (\{.*\})\s*$")


def read_epochs(log_text: str) -> list[dict]:
    """The log's epoch records, one per epoch in epoch order (the last one where an epoch repeats)."""
    epochs: dict[int, dict] = {}
    for line in log_text.replace("\r", "\n").splitlines():
        match = RECORD.search(line)
        if match is None:
            continue
        record = json.loads(match.group(1))
        if record.get("event") == "epoch":
            epochs[int(record["epoch"])] = record
    return [epochs[k] for k in sorted(epochs)]


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return str(round(float(value), digits))


def to_csv(records: list[dict]) -> str:
    """CSV text in the layout of experiments/reference/reference-lenet-bmr-ss-seed137.csv."""
    n_layers = max((len(r["pruned_layer"]) for r in records), default=0)
    header = ["epoch", "pruned_fraction", "accuracy", "ece", "nll", "avg_loss"]
    header += [f"pruned_layer{k}" for k in range(n_layers)]
    for k in range(n_layers - 1):
        header += [f"zeta_after_layer{k}", f"df_pos_layer{k}"]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for r in records:
        row = [r["epoch"]] + [_fmt(r[key], 4) for key in ("pruned_fraction", "accuracy", "ece", "nll")]
        row.append(f"{float(r['avg_loss']):.2f}")
        row += [_fmt(p, 4) for p in r["pruned_layer"]]
        zeta, df_pos = r.get("zeta_after") or [], r.get("df_pos") or []
        for k in range(n_layers - 1):
            row += [_fmt(zeta[k], 4) if zeta else "", _fmt(df_pos[k], 4) if df_pos else ""]
        writer.writerow(row)
    return out.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path, help="the reference run's log")
    parser.add_argument("out", type=Path, help="the CSV to write")
    args = parser.parse_args()
    records = read_epochs(args.log.read_text(errors="replace"))
    atomic_write_text(args.out, to_csv(records))
    print(f"{args.out}: {len(records)} epochs")


if __name__ == "__main__":
    main()
