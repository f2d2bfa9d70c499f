#!/usr/bin/env bash
# issue 19: compare --jobs 2 against the sequential grid, one after the other
set -u
export PYTHONPATH=/work/wt/scale HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
t() { local name=$1; shift; local s=$(date +%s.%N); "$@" > $name.log 2>&1; local rc=$?; local e=$(date +%s.%N); echo "$name rc=$rc wall=$(echo "$e - $s" | bc) load=$(cut -d' ' -f1-3 /proc/loadavg)" >> times.txt; }
GRID="--nets lenet --methods flat-ff bmr-th --seeds 0 1 --data fashion-mnist --epochs 2 --steps-per-epoch 50 --warmup-steps 50 --samples 10 --no-progress --no-plots"
date -u >> times.txt
t grid-seq python -m pyrozoo compare $GRID --out grid-seq
t grid-jobs2 python -m pyrozoo compare $GRID --out grid-jobs2 --jobs 2
date -u >> times.txt
