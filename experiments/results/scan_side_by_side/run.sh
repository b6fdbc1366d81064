set -e
for rev in prev head prev head; do
  dir=/work/main; [ $rev = prev ] && dir=/tmp/prev
  (cd $dir && /work/main/.venv/bin/python experiments/bench_train.py --compare=small --only=dense,mole-4e --steps=6 --warmup=1 --json=/tmp/bt2/$rev.json > /tmp/bt2/$rev.log 2>&1)
  python3 -c "import json;print('$rev', [(r['name'], round(r['step_time_s'],3), r['xla_flops_per_token'], r['final_loss']) for r in json.load(open('/tmp/bt2/$rev.json'))['rows']])"
done
