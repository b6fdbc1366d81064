r"""Expert-cache policies on real routing: Random vs LRU vs Belady (Read-ME's pre-gated serving).

Question: when a MoE's experts are offloaded and each layer keeps k of them in device memory, how
many expert loads does each replacement policy save? LRU is what the offloading baseline can do
(a layer's experts are known only once its router has run); Belady — drop the expert whose next
use is farthest away — is optimal, and is what Read-ME's pre-gating router makes realisable,
because its routes are computed before the backbone runs.
Expected (Read-ME paper, Table 4; shared cache, batched requests; capacity 2 / 3 / 4 / 5): Random
34.2 / 50.1 / 67.5 / 82.9 %, LRU 33.9 / 52.4 / 67.0 / 83.5 %, Belady 44.2 / 61.8 / 77.2 / 88.0 %
hit ratio: LRU no better than Random, Belady about 10 points above both.

Method: the trained MoE-10E of bench_offload (`runs/bench_offload/moe`, top-2 of 10 experts in
each of 4 layers, its float16 expert store) decodes validation text teacher-forced, `--batch`
sequences at a time, one token per step, recording each layer's set of needed experts per step
(the routes do not depend on the cache). Each layer's trace is replayed through a cache of each
capacity under each policy (`mole_jax/infer/offload/policies.py`, whose LRU replay equals the
offload engine's own hit count, tested); Random is the mean of 5 seeds.
Caveat: these are this MoE's own per-layer routes; a Read-ME model's pre-gating router (one route
per token for all layers) would produce different ones. Per-layer caches, not Read-ME's shared one.

    python experiments/bench_offload.py --size=small   # once: trains and exports the MoE
    python experiments/bench_cache.py [--tokens=512] [--batch=1,8] [--capacity=1,2,3,4,5,6,8]
"""

from __future__ import annotations

import json
import os

import _paths  # noqa: F401
import numpy as np
from _tables.bench import cache_table
from absl import app, flags, logging

from mole_jax.eval.validation import val_batches
from mole_jax.infer.engine import build_engine
from mole_jax.infer.offload.policies import POLICIES, simulate
from mole_jax.model.config import model_config
from mole_jax.workdir import Workdir

flags.DEFINE_string("workdir", "runs/bench_offload/moe", "A trained MoE with an expert store.")
flags.DEFINE_string("store", "experts_float16", "The expert store under the workdir.")
flags.DEFINE_integer("tokens", 512, "Decode steps recorded per batch size.")
flags.DEFINE_list("batch", ["1", "8"], "Sequences decoded together.")
flags.DEFINE_list("capacity", ["1", "2", "3", "4", "5", "6", "8"], "Experts cached per layer.")
flags.DEFINE_string("json", "experiments/results/bench_cache.json", "Write the result here.")
FLAGS = flags.FLAGS
RANDOM_SEEDS = 5


def record_trace(engine, batch: int, steps: int) -> dict[int, list[set[int]]]:
    """Each MoE layer's needed-expert sets over `steps` teacher-forced decode steps."""
    engine.reset_stats()  # also empties the recorded trace
    windows = [b[:batch, :-1] for b in list(val_batches(FLAGS.workdir, n_batches=64))]
    done = 0
    for ids in windows:
        if ids.shape[0] < batch:
            raise SystemExit(f"--batch={batch} exceeds the run's {ids.shape[0]} sequences")
        cache = engine.init_cache(batch, ids.shape[1])
        for t in range(ids.shape[1]):
            _, cache = engine.forward(ids[:, t : t + 1], cache)
            done += 1
            if done == steps:
                return engine.trace
    raise SystemExit(f"the validation split holds fewer than {steps} steps")


def replay(trace: dict[int, list[set[int]]], capacity: int, policy: str) -> dict:
    seeds = range(RANDOM_SEEDS) if policy == "random" else (0,)
    runs = [[simulate(t, capacity, policy, seed) for t in trace.values()] for seed in seeds]
    hits = np.mean([sum(r["hits"] for r in layers) for layers in runs])
    lookups = sum(r["lookups"] for r in runs[0])
    return dict(hit_rate=float(hits / lookups), loads=float(lookups - hits), lookups=lookups)


def main(_):
    logging.set_verbosity(logging.WARNING)
    # Every expert stays cached (capacity = all): the trace is the same, with fewer reads.
    n_experts = model_config(Workdir(FLAGS.workdir).config).ffn.experts
    engine = build_engine(
        FLAGS.workdir, "moe_offload", store=FLAGS.store, capacity=n_experts, record=True
    )
    rows = []
    for b in map(int, FLAGS.batch):
        trace = record_trace(engine, b, FLAGS.tokens)
        for k in map(int, FLAGS.capacity):
            row = dict(batch=b, capacity=k, steps=FLAGS.tokens)
            for p in POLICIES:
                r = replay(trace, k, p)
                row[p] = r["hit_rate"]
                row[f"{p}_loads_per_token"] = r["loads"] / (FLAGS.tokens * b)
            rows.append(row)
    print(cache_table(rows, n_experts))
    if FLAGS.json:
        os.makedirs(os.path.dirname(FLAGS.json) or ".", exist_ok=True)
        with open(FLAGS.json, "w") as f:
            json.dump(dict(workdir=FLAGS.workdir, experts=n_experts, rows=rows), f, indent=2)


if __name__ == "__main__":
    app.run(main)
