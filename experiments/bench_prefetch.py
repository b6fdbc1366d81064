"""Expert recall of speculative prefetch against how many experts it reads and how far ahead.

Question: when a MoE's experts are offloaded, how many of the experts a layer needs during decoding
are already resident (LRU cache) or on their way (prefetched) — for prefetch off, and for the
guess's best 1 or 2 experts per token, guessed 1, 2 or 3 layers ahead? (The MoE-offloading
paper's Fig. 2 shape: recall falls with the distance and rises with the number prefetched.)

    python experiments/bench_prefetch.py --workdir=runs/zero_shot/moe-10e-s0 [--capacity=2]

Method: a trained MoE workdir (exported to an fp16 expert store if it has none of this step);
`--prompts` held-out windows of the run's validation split as prompts of `--prompt` tokens, each
decoded greedily for `--new` tokens at batch 1 through the `moe_offload` engine; the counters of
the decode steps only (the prefill's are subtracted). expert_recall: needed experts cached or being
read when needed; prefetch_recall: needed experts the guess named; reads/token: experts read from
storage per decoded token (prefetched ones included, used or not). Counts, not times: the
figures do not depend on the machine.
"""

from __future__ import annotations

import json

import _paths  # noqa: F401
import numpy as np
from _stores import fresh
from absl import app, flags

from mole_jax.eval.validation import val_batches
from mole_jax.infer.engine import build_engine
from mole_jax.infer.export import export_experts
from mole_jax.infer.generate import generate_steps
from mole_jax.stores.experts import ExpertStore

flags.DEFINE_string("workdir", "runs/zero_shot/moe-10e-s0", "A trained MoE workdir.")
flags.DEFINE_integer("capacity", 2, "Experts cached per layer (LRU).")
flags.DEFINE_integer("prompts", 4, "Prompts (held-out windows).")
flags.DEFINE_integer("prompt", 64, "Prompt tokens.")
flags.DEFINE_integer("new", 32, "Tokens decoded per prompt.")
flags.DEFINE_string("json", "experiments/results/bench_prefetch.json", "Write the rows here.")
FLAGS = flags.FLAGS

SETTINGS = [dict(prefetch=False)] + [
    dict(prefetch=True, prefetch_k=k, lookahead=a) for k in (1, 2) for a in (1, 2, 3)
]
COUNTERS = ("lookups", "hits", "predicted", "ready", "experts_read", "bytes_read")


def decode_counts(engine, prompts) -> dict:
    """The engine's counters summed over the decode steps of every prompt."""
    total = dict.fromkeys(COUNTERS, 0)
    for prompt in prompts:
        engine.reset_stats()
        steps = generate_steps(engine, prompt[None], FLAGS.new)
        next(steps)  # the prefill
        after_prefill = {k: engine.stats()[k] for k in COUNTERS}
        for _ in steps:
            pass
        for k in COUNTERS:
            total[k] += engine.stats()[k] - after_prefill[k]
    return total


def main(_):
    fresh(
        ExpertStore,
        FLAGS.workdir,
        "experts",
        lambda: export_experts(FLAGS.workdir, dtype="float16"),
    )
    windows = np.concatenate(list(val_batches(FLAGS.workdir, n_batches=FLAGS.prompts)))
    prompts = windows[: FLAGS.prompts, : FLAGS.prompt]
    rows = []
    for setting in SETTINGS:
        engine = build_engine(FLAGS.workdir, "moe_offload", capacity=FLAGS.capacity, **setting)
        c = decode_counts(engine, prompts)
        tokens = FLAGS.prompts * (FLAGS.new - 1)
        row = dict(
            setting,
            expert_recall=c["ready"] / c["lookups"],
            prefetch_recall=c["predicted"] / c["lookups"],
            hit_rate=c["hits"] / c["lookups"],
            reads_per_token=c["experts_read"] / tokens,
            bytes_per_token=c["bytes_read"] / tokens,
            **c,
        )
        rows.append(row)
        print(row, flush=True)
    print(f"\ncapacity {FLAGS.capacity}/layer, {FLAGS.prompts} prompts x {FLAGS.new} tokens")
    print(f"{'prefetch':>22} {'expert recall':>14} {'guess recall':>13} {'hit rate':>9} "
          f"{'reads/token':>12}")  # fmt: skip
    for r in rows:
        name = f"best {r['prefetch_k']}, {r['lookahead']} ahead" if r["prefetch"] else "off"
        print(f"{name:>22} {r['expert_recall']:14.3f} {r['prefetch_recall']:13.3f} "
              f"{r['hit_rate']:9.3f} {r['reads_per_token']:12.2f}")  # fmt: skip
    meta = {k: getattr(FLAGS, k) for k in ("workdir", "capacity", "prompts", "prompt", "new")}
    with open(FLAGS.json, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    app.run(main)
