#!/bin/bash
# bench_offload side by side: previous main (/tmp/old = 684811b) and this revision (/work/main),
# the same reduced settings, each revision training its own three models under its own root.
set -e
ARGS="--size=small --train_steps=40 --batches=1,8 --rounds=3 --new=16 --prompt=64 --eval_batches=2"
for rep in ${REPS:-1 2}; do
  for rev in old new; do
    dir=/work/main; [ $rev = old ] && dir=/tmp/old
    (cd $dir && /work/main/.venv/bin/python experiments/bench_offload.py $ARGS \
      --root=/tmp/bo_$rev --out=/tmp/bo/${rev}_$rep > /tmp/bo/${rev}_$rep.log 2>&1)
    echo "rep $rep $rev done"
  done
done
