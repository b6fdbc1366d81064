#!/usr/bin/env bash
# The package move (issue 25) left every train step's program unchanged: the same XLA FLOPs per
# token and the same loss after 2 steps for every kind, before (277e5f3) and after the move.
# before.json: at 277e5f3; after.json: at the move's commit (0629fc4); head.json: at the end of
# that session (4ae4bcd: MoE's grouped matmul resolved at trace time, progress, ...). Each:
python experiments/bench_train.py --compare=tiny --steps=2 --warmup=0 --json="$1"
