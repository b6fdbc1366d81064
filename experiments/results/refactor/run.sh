#!/bin/bash
# bench_train side by side: previous main (/tmp/old, 684811b) and this revision, alternating per row.
set -e
for rep in 1 2; do
for row in dense moe-10e peer mole-4e "mole-4e per_position"; do
  for rev in old new; do
    dir=/tmp/new; [ $rev = old ] && dir=/tmp/old
    tag=$(echo "$row" | tr ' ' '_')
    (cd $dir && /work/main/.venv/bin/python experiments/bench_train.py --compare=small --only="$row" --json=/tmp/bt/${rev}_${tag}_${rep}.json > /tmp/bt/${rev}_${tag}_${rep}.log 2>&1)
    echo "$rep $rev $row $(python3 -c "import json;r=json.load(open('/tmp/bt/${rev}_${tag}_${rep}.json'))['rows'][0];print(round(r['step_time_s'],4), round(r['tokens_per_s']))")"
  done
done
done
