# bench_train side by side: prev = 71b1ca8 (this session's start), head = this session's end.
# Rows: dense, MoE-10E (moe.py's dispatch was refactored) and MoLE-4E, small, 6 steps.
set -e
rm -rf /tmp/prev3 && git -C /work/main worktree add -f /tmp/prev3 71b1ca8 -q --detach
mkdir -p /tmp/bt4
for rev in prev head prev head; do
  dir=/work/main; [ $rev = prev ] && dir=/tmp/prev3
  (cd $dir && GLIBC_TUNABLES=glibc.malloc.hugetlb=1 PYTHONPATH=$dir /work/main/.venv/bin/python experiments/bench_train.py --compare=small --only=dense,moe-10e,mole-4e --steps=6 --warmup=1 --json=/tmp/bt4/$rev.json > /tmp/bt4/$rev.log 2>&1)
  python3 -c "import json;print('$rev', [(r['name'], round(r['step_time_s'],3), r['xla_flops_per_token'], r['final_loss']) for r in json.load(open('/tmp/bt4/$rev.json'))['rows']])"
done
