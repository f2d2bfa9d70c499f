#!/bin/bash
# issue 16: ivon-bmr on the reference schedule (50 x 500 steps, batch 120), MLP then LeNet, one thread on core 0,
# after the issue-17 MLP pair there
while pgrep -f "runs17/pair.sh" > /dev/null; do sleep 20; done
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 PYTHONPATH=/work/frozen
cd /work/runs16
git -C /work/frozen rev-parse HEAD > commit
for NET in mlp lenet; do
  date -u +"start $NET %FT%TZ" >> chain.log
  taskset -c 0 python -m pyrozoo train --net $NET --method ivon-bmr --data fashion-mnist --eval-every 10 --seed 0 --no-progress --out $NET-ivon-bmr > $NET.out 2>&1
  date -u +"done $NET %FT%TZ" >> chain.log
done
