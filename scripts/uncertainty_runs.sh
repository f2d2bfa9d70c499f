#!/bin/bash
# Uncertainty under shift on the full Fashion-MNIST: 8 trainings in one sequential chain, each followed by
# `pyrozoo uncertainty`. One thread. Run from the worktree root:
#   nohup bash scripts/uncertainty_runs.sh > fmfull-chain.log 2>&1 &
# (experiments/ keeps each run's metrics.csv and uncertainty.csv; scripts/uncertainty_tables.py prints the tables)
# DATA / EPOCHS / STEPS / SAMPLES / PREFIX override the schedule (for a dry run on fashion-mnist-mini), NETS and
# METHODS the runs and their order (space-separated).
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
DATA=${DATA:-fashion-mnist}
EPOCHS=${EPOCHS:-5}
STEPS=${STEPS:-500}
SAMPLES=${SAMPLES:-20}
PREFIX=${PREFIX:-experiments/regression/runs/fmfull}
NETS=${NETS:-lenet mlp}
METHODS=${METHODS:-flat-map flat-ff tiered-ff bmr-th}
for net in $NETS; do
  for m in $METHODS; do
    out=$PREFIX-$net-$m
    echo "$(date -u +%FT%TZ) start $net $m -> $out"
    python -m pyrozoo train --net $net --data $DATA --method $m --epochs $EPOCHS --steps-per-epoch $STEPS \
      --eval-every 5 --samples $SAMPLES --seed 0 --out $out > $out.train.log 2>&1 \
      || { echo "$(date -u +%FT%TZ) train FAILED $net $m"; continue; }
    mv $out.train.log $out/train.log
    echo "$(date -u +%FT%TZ) trained $net $m"
    python -m pyrozoo uncertainty $out --samples $SAMPLES > $out/uncertainty.log 2>&1 \
      || echo "$(date -u +%FT%TZ) uncertainty FAILED $net $m"
    echo "$(date -u +%FT%TZ) done $net $m"
  done
done
echo "$(date -u +%FT%TZ) chain finished"
