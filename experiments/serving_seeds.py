"""Expert-aware batching against FIFO over several queues, the padding artefact measured on its own.

Claim (Read-ME §5, Table 4), declared before the runs (`CLAIMS` in `_serving_claims.py`): on a
decode-heavy queue, expert-aware batching (Algorithm 1) needs fewer unique experts per batch than
decode-first FIFO and lowers the latency per token (mean and p95), at an offered load of 3 and
backlogged (inf).

    python experiments/serving_seeds.py --workdir=runs/pregated-small-8e --min_prompt=2 \\
        --prompt=4 --new=32

Design. Each of `--seeds` draws its own queue (prompts, lengths, order) and its own Poisson
arrivals (`bench_serving.py`'s method and flags, modelled rows only); both batchings are replayed
on the same queue and arrivals, so the runs are paired by seed: a paired t test over the seeds'
differences (FIFO - expert-aware: > 0 supports the claim), Holm over the declared claims, each
line with its 95 % interval and minimum detectable effect (`mole_jax/sweeps/stats.py`).

The artefact. The lookahead engine pads a batch's expert slots to a power of two, so compute(n, k)
is a step function of k and a latency gain can come from batches dropping into the 4-slot bucket
rather than from fewer experts. Two cost models are measured side by side in this run: `exact`
(one compile per k, no padding: the artefact removed) and `padded` (as the engine serves). The
declared latency claims are tested on `exact`; `padded` is reported as exploratory, beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import _paths  # noqa: F401
import bench_serving as bs
import numpy as np
from _serving_claims import CLAIMS, EXPLORATORY, SOURCE, tests, verdict_line
from absl import app, flags

flags.DEFINE_list("seeds", ["0", "1", "2", "3", "4", "5"], "One queue and arrival stream each.")
FLAGS = flags.FLAGS


def one_seed(seed: int, engine, windows, costs: dict) -> list[dict]:
    """The modelled rows of one queue under each cost model."""
    FLAGS.seed = seed  # bench_serving draws the arrivals from FLAGS.seed
    requests, _ = bs.make_requests(engine, np.random.default_rng(seed), windows)
    rows = []
    for name, cost in costs.items():
        rows += [dict(r, seed=seed, cost=name) for r in bs.modelled(requests, cost)]
    return rows


def main(_):
    print("declared claims (FIFO - expert-aware > 0; paired over seeds, Holm):")
    for c in CLAIMS:
        print("  ", c)
    engine, windows, sizes, layers, load = bs.setup()
    m = engine.model_config
    compute = {name: bs.compute_seconds("experts_float16", sizes, m.ffn.experts, windows, exact)
               for name, exact in (("exact", True), ("padded", False))}  # fmt: skip
    costs = {name: (lambda t, u, j, c=c: bs.batch_seconds(t, u, j, c, load, len(layers)))
             for name, c in compute.items()}  # fmt: skip
    rows = [r for s in map(int, FLAGS.seeds) for r in one_seed(s, engine, windows, costs)]
    declared, exploratory = tests(rows, CLAIMS), tests(rows, EXPLORATORY)
    print("\ndeclared:\n" + "\n".join(map(verdict_line, declared)))
    print("\nexploratory (not declared):\n" + "\n".join(map(verdict_line, exploratory)))
    names = ("workdir", "requests", "min_prompt", "prompt", "new", "budget", "latency_capacity",
             "load", "seeds")  # fmt: skip
    out = dict(flags={k: FLAGS[k].value for k in names}, source=SOURCE, compute_s=compute,
               load_s=load, modelled=rows, declared=declared, exploratory=exploratory)  # fmt: skip
    Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.json).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {FLAGS.json}")


if __name__ == "__main__":
    FLAGS.set_default("json", "experiments/results/serving_seeds.json")
    FLAGS.set_default("rounds", 0)
    app.run(main)
