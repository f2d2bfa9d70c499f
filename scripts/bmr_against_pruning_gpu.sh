#!/bin/bash
# On one GPU: resnet18 bmr-th on Fashion-MNIST for a fixed wall-clock budget (stopped by `timeout`;
# its last checkpoint, saved after every epoch, is the state measured), its flat-map twin, then
# benchmarks/prune_compare.py (metrics on the GPU, latency on the CPU). Logs and summaries go to $OUT.
#   OUT=... [NET=resnet18] [DEVICE=cuda] [DATA=fashion-mnist] [DATA_DIR=...] [BATCH=128] [STEPS=200]
#   [BMR_SECONDS=240] [BMR_LR=0.01] [MAP_SECONDS=120] [THREADS=8] [FROM_MAP_EPOCHS=N]
#   bash scripts/bmr_against_pruning_gpu.sh
# Without FROM_MAP_EPOCHS, bmr-th trains from the net's initialisation first and flat-map then trains for the
# epochs bmr-th reached; with it, flat-map trains FROM_MAP_EPOCHS epochs first and bmr-th starts from its net
# (--init-from), so that BMR prunes a trained network.
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
BMR_LR=${BMR_LR:-0.01}
MAP_SECONDS=${MAP_SECONDS:-120}
THREADS=${THREADS:-8}
FROM_MAP_EPOCHS=${FROM_MAP_EPOCHS:-}
RUNS=${RUNS:-$(mktemp -d)}
BMR="$RUNS/$NET-bmr-th" MAP="$RUNS/$NET-flat-map"
S="--net $NET --data $DATA --batch-size $BATCH --steps-per-epoch $STEPS --eval-every $EVAL_EVERY
   --eval-batch-size 2000 --device $DEVICE --no-progress --seed 0 ${DATA_DIR:+--data-dir $DATA_DIR}"
epoch() { python3 -c "from pyrozoo.runfolder import committed_epoch; print(committed_epoch('$1'))"; }
flat_map() {  # flat-map for $1 epochs
  echo "== flat-map for $1 epochs (at most ${MAP_SECONDS}s): $(date -u +%FT%TZ)"
  timeout "$MAP_SECONDS" python3 -m pyrozoo train $S --method flat-map --epochs "$1" --out "$MAP" 2>&1 |
    tee "$OUT/flat-map.log"
  echo "== flat-map committed epoch $(epoch "$MAP")"
}
bmr_th() {  # bmr-th for BMR_SECONDS, with any further options
  echo "== bmr-th for ${BMR_SECONDS}s: $(date -u +%FT%TZ)"
  timeout "$BMR_SECONDS" python3 -m pyrozoo train $S --method bmr-th --epochs 1000 --warmup-steps "$STEPS" \
    --lr "$BMR_LR" --samples 8 --prune-units --out "$BMR" "$@" 2>&1 | tee "$OUT/bmr-th.log"
  echo "== bmr-th stopped after committing epoch $(epoch "$BMR")"
}

if [ -n "$FROM_MAP_EPOCHS" ]; then
  flat_map "$FROM_MAP_EPOCHS"
  python3 -c "import sys, torch
from pyrozoo.train import Run
from pyrozoo.bmr.rebuild import rebuild
run = Run.open(sys.argv[1], log=lambda text: None)
torch.save(rebuild(run.model, run.guide, remove_dead=False).state_dict(), sys.argv[2])" "$MAP" "$RUNS/flat-map-net.pt"
  bmr_th --init-from "$RUNS/flat-map-net.pt"
else
  bmr_th
  flat_map "$(epoch "$BMR")"
fi
echo "== prune_compare: $(date -u +%FT%TZ)"
python3 benchmarks/prune_compare.py "$BMR" "$MAP" --threads "$THREADS" --repeats 5 --out "$OUT/prune_compare.json" \
  2>&1 | tee "$OUT/prune_compare.txt"
tar -czf "$OUT/runs.tar.gz" -C "$RUNS" --exclude '*.pt' --exclude '*.pt2' .
echo "== done: $(date -u +%FT%TZ)"
