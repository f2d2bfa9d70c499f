#!/bin/bash
# Issue 15 on one GPU: resnet18 bmr-th on Fashion-MNIST for a fixed wall-clock budget (stopped by `timeout`;
# its last checkpoint, saved after every epoch, is the state measured), its flat-map twin for the same number of
# epochs, then benchmarks/prune_compare.py (metrics on the GPU, latency on the CPU). Logs and summaries go to $OUT.
#   OUT=... [NET=resnet18] [DEVICE=cuda] [DATA=fashion-mnist] [DATA_DIR=...] [BATCH=128] [STEPS=200] [BMR_SECONDS=240]
#   [MAP_SECONDS=120] [THREADS=8] bash experiments/runs/issue15/gpu/run.sh
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:?set OUT}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-fashion-mnist}
DATA_DIR=${DATA_DIR:-}
NET=${NET:-resnet18}
BATCH=${BATCH:-128}
STEPS=${STEPS:-200}
EVAL_EVERY=${EVAL_EVERY:-5}
BMR_SECONDS=${BMR_SECONDS:-240}
MAP_SECONDS=${MAP_SECONDS:-120}
THREADS=${THREADS:-8}
RUNS=${RUNS:-$(mktemp -d)}
S="--net $NET --data $DATA --batch-size $BATCH --steps-per-epoch $STEPS --eval-every $EVAL_EVERY
   --eval-batch-size 2000 --device $DEVICE --no-progress --seed 0 ${DATA_DIR:+--data-dir $DATA_DIR}"
epoch() { python3 -c "from pyrozoo.train import committed_epoch; print(committed_epoch('$1'))"; }

echo "== bmr-th for ${BMR_SECONDS}s: $(date -u +%FT%TZ)"
timeout "$BMR_SECONDS" python3 -m pyrozoo train $S --method bmr-th --epochs 1000 --warmup-steps "$STEPS" \
  --samples 8 --prune-units --out "$RUNS/$NET-bmr-th" 2>&1 | tee "$OUT/bmr-th.log"
K=$(epoch "$RUNS/$NET-bmr-th")
echo "== bmr-th stopped after committing epoch $K; flat-map for $K epochs: $(date -u +%FT%TZ)"
timeout "$MAP_SECONDS" python3 -m pyrozoo train $S --method flat-map --epochs "$K" \
  --out "$RUNS/$NET-flat-map" 2>&1 | tee "$OUT/flat-map.log"
echo "== flat-map committed epoch $(epoch "$RUNS/$NET-flat-map"); prune_compare: $(date -u +%FT%TZ)"
python3 benchmarks/prune_compare.py "$RUNS/$NET-bmr-th" "$RUNS/$NET-flat-map" --threads "$THREADS" \
  --repeats 5 --out "$OUT/prune_compare.json" 2>&1 | tee "$OUT/prune_compare.txt"
tar -czf "$OUT/runs.tar.gz" -C "$RUNS" --exclude '*.pt' --exclude '*.pt2' .
echo "== done: $(date -u +%FT%TZ)"
