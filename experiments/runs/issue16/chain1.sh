#!/bin/bash
# issue 16/17: ivon-bmr MLP, reference schedule, with compaction (IVON's state compacts since this commit), core 1
while pgrep -f "prune_compare.py" > /dev/null; do sleep 15; done
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=/work/frozen2
cd /work/runs16
git -C /work/frozen2 rev-parse HEAD > commit-compact
date -u +"start mlp compact %FT%TZ" >> chain.log
taskset -c 1 python -m pyrozoo train --net mlp --method ivon-bmr --data fashion-mnist --eval-every 10 --seed 0 --no-progress --out mlp-ivon-bmr-compact > mlp-compact.out 2>&1
date -u +"done mlp compact %FT%TZ" >> chain.log
