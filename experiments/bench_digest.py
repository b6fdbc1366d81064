"""What verifying a checkpoint costs: the earlier SHA-256 digests against `digest.py`'s.

Question: the checkpoint digests used to gather each leaf to the host and SHA-256 it (every host
received every leaf at every save and restore); `digest.py` sums mixed 32-bit terms where the
shards live and moves four scalars per leaf. What does each cost on one device, where the
SHA-256 path moves nothing between hosts (the old scheme's best case)?

    python experiments/bench_digest.py [--sizes=small,160m] [--kinds=dense,mole-4e] [--reps=3]

Method: the train state (parameters, AdamW state, step) of `trainer.setup` for each size and
kind, initialised for real on one CPU device; the median of `--reps` timings of each digest over
the whole state (parameters digest + per-leaf digests + train-state digest, as `save` computes
them), after one untimed call (jit compilation of the new digest, page-in of the old).
"""

from __future__ import annotations

import json
import time

import _paths  # noqa: F401
import jax
import numpy as np
from _kinds import KINDS
from absl import app, flags

from mole_jax.stores import digest
from mole_jax.train import checkpoint, trainer

flags.DEFINE_list("sizes", ["small", "160m"], "Model sizes.")
flags.DEFINE_list("kinds", ["dense", "mole-4e"], "Rows.")
flags.DEFINE_integer("reps", 3, "Timed repetitions (median).")
flags.DEFINE_string("json", "experiments/results/bench_digest.json", "Write the rows here.")
FLAGS = flags.FLAGS


def _save_digests(fn, state) -> None:
    """What `Checkpointer.save` computes: the params (whole and per leaf) and the train state."""
    fn(state["params"])
    fn({k: v for k, v in state.items() if k != "params"})


def _median_s(fn, state) -> float:
    _save_digests(fn, state)
    times = []
    for _ in range(FLAGS.reps):
        t = time.perf_counter()
        _save_digests(fn, state)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main(_):
    rows = []
    for size in FLAGS.sizes:
        for kind in FLAGS.kinds:
            tr = trainer.setup(KINDS[kind](size))
            state = tr.init_state()
            nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
            row = dict(size=size, kind=kind, state_mb=round(nbytes / 2**20, 1))
            row["sha256_s"] = round(_median_s(checkpoint._sha256_digests, state), 3)
            row["digest_s"] = round(_median_s(digest.digests, state), 3)
            rows.append(row)
            print(row, flush=True)
            del state, tr
    print(f"\n{'size':6} {'kind':8} {'state MB':>9} {'SHA-256 s':>10} {'digest.py s':>12}")
    for r in rows:
        print(
            f"{r['size']:6} {r['kind']:8} {r['state_mb']:9.1f} "
            f"{r['sha256_s']:10.3f} {r['digest_s']:12.3f}"
        )
    meta = dict(devices=str(jax.devices()[0].device_kind), reps=FLAGS.reps, jax=jax.__version__)
    with open(FLAGS.json, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    app.run(main)
