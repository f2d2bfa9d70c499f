#!/bin/bash
# issue 17: MLP bmr-th, reference schedule, compacted then uncompacted, same seed, one thread, pinned to core 0
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
cd /work/runs17
C="--net mlp --method bmr-th --data fashion-mnist --seed 0 --no-progress --eval-every 5"
date -u +"start compact %FT%TZ" >> pair.log
taskset -c 0 python -m pyrozoo train $C --out mlp-bmr-th-compact > compact.out 2>&1
date -u +"start nocompact %FT%TZ" >> pair.log
taskset -c 0 python -m pyrozoo train $C --no-compact --out mlp-bmr-th-nocompact > nocompact.out 2>&1
date -u +"done %FT%TZ" >> pair.log
