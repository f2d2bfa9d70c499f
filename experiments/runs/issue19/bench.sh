#!/usr/bin/env bash
# issue 19 measurements; run from /tmp/scale-bench with PYTHONPATH=/work/wt/scale
set -u
export PYTHONPATH=/work/wt/scale OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
RUN="--net lenet --method bmr-th --data fashion-mnist --epochs 4 --steps-per-epoch 150 --warmup-steps 150 --samples 20 --eval-every 4 --no-progress"
t() { local name=$1; shift; local s=$(date +%s.%N); "$@" > $name.log 2>&1; local rc=$?; local e=$(date +%s.%N); echo "$name rc=$rc wall=$(echo "$e - $s" | bc) load=$(cut -d' ' -f1-3 /proc/loadavg)" >> times.txt; }
date -u >> times.txt
t one-s0 python -m pyrozoo train $RUN --seed 0 --out one-s0
t two-s0 python -m torch.distributed.run --standalone --nproc_per_node 2 -m pyrozoo train $RUN --seed 0 --out two-s0
t one-s1 python -m pyrozoo train $RUN --seed 1 --out one-s1
t two-s1 python -m torch.distributed.run --standalone --nproc_per_node 2 -m pyrozoo train $RUN --seed 1 --out two-s1
# (stopped here: the MLP/LeNet grid below was too slow on the busy machine; grid.sh ran a LeNet subset instead)
GRID="--nets mlp lenet --methods flat-ff bmr-th --data fashion-mnist --epochs 2 --steps-per-epoch 100 --warmup-steps 100 --samples 10 --no-progress --no-plots"
OMP_NUM_THREADS=2 t grid-seq python -m pyrozoo compare $GRID --out grid-seq
OMP_NUM_THREADS=2 t grid-jobs2 python -m pyrozoo compare $GRID --out grid-jobs2 --jobs 2
date -u >> times.txt
