#!/bin/bash
# CPU 1: the ViT with bmr-lss, compacted, for a comparison with the uncompacted twin run on CPU 0 (issue 17)
export PYTHONPATH=/work/frozen5 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
C="--method bmr-lss --warmup-steps 100 --data fashion-mnist --epochs 10 --steps-per-epoch 100 --samples 8 --eval-every 10 --seed 0 --no-progress"
cd /work/runs-s5
/usr/bin/time -v taskset -c 1 python -m pyrozoo train --net vit $C --out vit-bmr-lss-compact > vit-compact.out 2>&1
