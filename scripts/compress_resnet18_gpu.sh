#!/bin/bash
# On one GPU (issue 28): NET (default resnet18) trained with plain Adam for EPOCHS on the full data
# (benchmarks/bn_cnn.py --net; or given as WEIGHTS), then `pyrozoo compress NET --target TARGET` against every
# baseline with the same fine-tune. Training, fine-tuning and the test metrics run on DEVICE; the Laplace fit,
# pruning and the latency (batch 1 and 256, THREADS CPU threads) on the host's CPU; the report reads the latency
# on the GPU too. Logs, the weights and the report (report.md/json, front.png, the nets) go to $OUT.
#   OUT=... [NET=resnet18] [WEIGHTS=trained.pt] [EPOCHS=3] [DEVICE=cuda] [DATA=fashion-mnist] [DATA_DIR=...]
#   [TARGET=latency=0.5] [STEPS=300] [FIT_SIZE=2000] [REPEATS=5] [THREADS=16] [BASELINES="tp-l1 ..."]
#   bash scripts/compress_resnet18_gpu.sh
# The GPU machine has no internet: DATA_DIR names a folder, carried with the working tree, holding the data's
# files (for Fashion-MNIST the four idx .gz files of /usr/share/datasets/fashion-mnist).
# Estimated, not yet run on a GPU: 6-8 minutes on an H100/H200 with a 16-core host at the defaults (training
# ~1 min at ~40 ms a step; the Laplace fit ~1 min; resnet18 at batch 256 takes ~0.5 s a pass on 8 host threads,
# so most of the rest is the bisections' timing). NET=resnet20 THREADS=1 gives issue 28's one-thread CPU
# latency. A check of the plumbing on a CPU (a few minutes):
#   OUT=/tmp/c DEVICE=cpu NET=lenet DATA=fashion-mnist-mini EPOCHS=0.5 STEPS=2 FIT_SIZE=64 REPEATS=1 THREADS=1 \
#   bash scripts/compress_resnet18_gpu.sh
set -eu -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
OUT=${OUT:?set OUT}
NET=${NET:-resnet18}
WEIGHTS=${WEIGHTS:-}
EPOCHS=${EPOCHS:-3}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-fashion-mnist}
DATA_DIR=${DATA_DIR:-}
TARGET=${TARGET:-latency=0.5}
STEPS=${STEPS:-300}
FIT_SIZE=${FIT_SIZE:-2000}
REPEATS=${REPEATS:-5}
THREADS=${THREADS:-16}
BASELINES=${BASELINES:-tp-l1 tp-group-norm tp-taylor global-magnitude}
mkdir -p "$OUT"
(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true) > "$OUT/machine.txt" 2>&1
python3 -c "import torch, torch_pruning, platform, os
print(platform.machine(), os.cpu_count(), 'cores; torch', torch.__version__, '; torch-pruning', torch_pruning.__version__)" \
  >> "$OUT/machine.txt"
if [ -z "$WEIGHTS" ]; then
  WEIGHTS="$OUT/$NET-dense.pt"
  echo "== training $NET for $EPOCHS epochs on $DEVICE: $(date -u +%FT%TZ)"
  python3 benchmarks/bn_cnn.py --net "$NET" --data "$DATA" ${DATA_DIR:+--data-dir "$DATA_DIR"} \
    --epochs "$EPOCHS" --device "$DEVICE" --threads "$THREADS" --out "$WEIGHTS" 2>&1 | tee "$OUT/train.log"
fi
echo "== compress $NET to $TARGET: $(date -u +%FT%TZ)"
# shellcheck disable=SC2086  # BASELINES is a list of words
python3 -m pyrozoo compress "$NET" --weights "$WEIGHTS" --pad-to 32 --data "$DATA" ${DATA_DIR:+--data-dir "$DATA_DIR"} \
  --target "$TARGET" --baselines $BASELINES --finetune-steps "$STEPS" --fit-size "$FIT_SIZE" \
  --repeats "$REPEATS" --threads "$THREADS" --device "$DEVICE" --no-progress --out "$OUT/compress" 2>&1 |
  tee "$OUT/compress.log"
echo "== done: $(date -u +%FT%TZ)"
