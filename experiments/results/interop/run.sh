#!/usr/bin/env bash
# Issue 27's backbone fields (GQA, gated FFN, tied head, llama3 RoPE; all off by default) left
# the default train step unchanged: hot_path_after_llama_fields.json (at d5aaec9 + gated experts)
# has the same XLA FLOPs per token and the same 2-step losses for every kind as
# ../layout_move/head.json. Made by:
python experiments/bench_train.py --compare=tiny --steps=2 --warmup=0 --json="$1"
# reference_check.json: checkpoints the official MoLE code saved from other random weights:
#   python tests/fixtures/hf/make_fixtures.py --mole_repo=MoLE --out=/tmp/ref --seed=7  (torch)
#   python experiments/check_reference.py --dir=/tmp/ref
