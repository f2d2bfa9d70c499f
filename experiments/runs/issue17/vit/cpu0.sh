#!/bin/bash
# CPU 0: Mixer bmr-lss compacted, then the ViT's uncompacted twin (issue 17), one thread each
export PYTHONPATH=/work/frozen5 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
C="--method bmr-lss --warmup-steps 100 --data fashion-mnist --epochs 10 --steps-per-epoch 100 --samples 8 --eval-every 10 --seed 0 --no-progress"
cd /work/runs-s5
/usr/bin/time -v taskset -c 0 python -m pyrozoo train --net mixer $C --out mixer-bmr-lss-compact > mixer-compact.out 2>&1
/usr/bin/time -v taskset -c 0 python -m pyrozoo train --net vit $C --no-compact --out vit-bmr-lss-nocompact > vit-nocompact.out 2>&1
