"""Format the uncertainty.csv (and metrics.csv) of the fmfull-NET-METHOD run folders as RESULTS.md tables:
``python scripts/uncertainty_tables.py experiments/regression/runs fmfull``."""

import os
import sys

import pandas as pd

root = sys.argv[1]
prefix = sys.argv[2] if len(sys.argv) > 2 else "fmfull"
methods = ["flat-map", "flat-ff", "tiered-ff", "bmr-th"]
for net in ["lenet", "mlp"]:
    rows = {}
    for m in methods:
        d = f"{root}/{prefix}-{net}-{m}"
        if os.path.exists(f"{d}/uncertainty.csv"):
            rows[m] = (pd.read_csv(f"{d}/uncertainty.csv"), pd.read_csv(f"{d}/metrics.csv"))
    if not rows:
        continue
    print(f"\n**{net}** (clean test set)\n")
    print("| method | accuracy | NLL | ECE | entropy AUROC | MI AUROC | pruned | training s |")
    print("|---|---|---|---|---|---|---|---|")
    for m, (u, met) in rows.items():
        c = u[u["shift"] == "none"].iloc[0]
        last = met.iloc[-1]
        mi = "-" if pd.isna(c.get("mi_auroc")) else f"{c['mi_auroc']:.3f}"
        print(
            f"| {m} | {c['accuracy']:.4f} | {c['nll']:.3f} | {c['ece']:.3f} | {c['entropy_auroc']:.3f} | {mi} | {last['pruned_fraction']:.3f} | {last['seconds']:.0f} |"
        )
    for shift in ["rotate", "noise"]:
        print(f"\n{net}, {shift}: accuracy / ECE / NLL per severity (0 = clean)\n")
        print("| method | 0 | 1 | 2 | 3 | 4 | 5 |")
        print("|---|---|---|---|---|---|---|")
        for m, (u, _) in rows.items():
            cells = []
            for sev in range(6):
                r = u[(u["shift"] == ("none" if sev == 0 else shift)) & (u["severity"] == sev)].iloc[0]
                cells.append(f"{r['accuracy']:.3f} / {r['ece']:.3f} / {r['nll']:.2f}")
            print(f"| {m} | " + " | ".join(cells) + " |")
