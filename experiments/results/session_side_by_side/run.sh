# bench_train side by side: prev = 60dc252 (this session's start), head = this session's end.
set -e
for rev in prev head prev head; do
  dir=/work/main; [ $rev = prev ] && dir=/tmp/prev
  (cd $dir && GLIBC_TUNABLES=glibc.malloc.hugetlb=1 /work/main/.venv/bin/python experiments/bench_train.py --compare=small --only=dense,mole-4e --steps=6 --warmup=1 --json=/tmp/bt3/$rev.json > /tmp/bt3/$rev.log 2>&1)
  python3 -c "import json;print('$rev', [(r['name'], round(r['step_time_s'],3), r['xla_flops_per_token'], r['final_loss']) for r in json.load(open('/tmp/bt3/$rev.json'))['rows']])"
done
