"""The MoE-offloading ablation (the shape of Eliseev & Mazur's Table 2) and quality per bit width.

Question: what do the LRU expert cache and speculative prefetch buy over loading experts as they
are needed, and over naively loading every expert of a layer, at 16 bits and at 4/3/2 bits — in
decode tokens/s at batch 1 and bytes read per token — and what does each width cost in loss?

    python experiments/bench_offload_ablation.py --workdir=runs/zero_shot/moe-10e-s0

Method: a trained MoE workdir; its experts exported once per width (`experts_<dtype>`). For each
width, four engines: naive (every expert of every MoE layer read per token), on demand (only the
chosen experts, no cache), + LRU (`--capacity` experts per layer), + LRU + speculative prefetch
(next layer's router on this layer's state, all top-k guesses). `--prompts` held-out prompts of
`--prompt` tokens are decoded greedily for `--new` tokens at batch 1; `--rounds` rounds, each
running every engine once in turn (this VM's speed drifts over minutes: interleaving keeps the
comparison fair), tokens/s = decoded tokens / median decode time. Storage is local disk through
tensorstore; with `--drop_cache` (default) the store's pages are evicted from the OS cache
(posix_fadvise DONTNEED) before every timed run, so each run's first reads come from the disk.
Quality: validation loss of each width through the offload engine over `--eval_batches` batches of
the run's validation windows, beside the in-memory model's.
"""

from __future__ import annotations

import json
import time

import _paths  # noqa: F401
import numpy as np
from _stores import drop_page_cache, fresh
from absl import app, flags

from mole_jax.eval.validation import evaluate, val_batches
from mole_jax.infer.engine import build_engine
from mole_jax.infer.export import export_experts
from mole_jax.infer.generate import generate
from mole_jax.stores.experts import ExpertStore

flags.DEFINE_string("workdir", "runs/zero_shot/moe-10e-s0", "A trained MoE workdir.")
flags.DEFINE_list("dtypes", ["float16", "int4", "int3", "int2"], "Expert store widths.")
flags.DEFINE_integer("capacity", 2, "Experts cached per layer in the LRU rows.")
flags.DEFINE_bool("drop_cache", True, "Evict the store's pages from the OS cache before each run.")
flags.DEFINE_integer("prompts", 2, "Prompts (held-out windows).")
flags.DEFINE_integer("prompt", 32, "Prompt tokens.")
flags.DEFINE_integer("new", 16, "Tokens decoded per prompt.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
flags.DEFINE_integer("eval_batches", 4, "Validation batches for the loss per width.")
flags.DEFINE_string("json", "experiments/results/bench_offload_ablation.json", "Rows go here.")
flags.DEFINE_string("dense_workdir", "runs/zero_shot/dense-s0", "Reference row: a dense model of "
                    "the same backbone, in memory ('' to skip).")  # fmt: skip
flags.DEFINE_string("mole_workdir", "runs/zero_shot/mole-4e-s0", "Reference row: a MoLE model "
                    "with its fp16 LUT offloaded (lut_float16; '' to skip).")  # fmt: skip
FLAGS = flags.FLAGS

ENGINES = {
    "naive (whole layer per token)": dict(capacity=0, load_all=True),
    "on demand (no LRU, no prefetch)": dict(capacity=0),
    "+ LRU": dict(capacity=None),
    "+ LRU + prefetch": dict(capacity=None, prefetch=True),
}


def stores(workdir: str) -> None:
    for dtype in FLAGS.dtypes:
        name = f"experts_{dtype}"
        fresh(
            ExpertStore,
            workdir,
            name,
            lambda d=dtype, n=name: export_experts(workdir, dtype=d, out=n),
        )


def decode_s(engine, prompts) -> tuple[float, int]:
    """(seconds of the decode steps, bytes read by them) over all prompts, cold caches."""
    seconds, nbytes = 0.0, 0
    for p in prompts:
        engine.reset_stats()
        out = generate(engine, p[None], FLAGS.new)
        seconds += sum(out["step_s"])
        nbytes += engine.stats().get("bytes_read", 0)
    return seconds, nbytes


def build_engines() -> tuple[dict, dict]:
    """({(width, name): engine} of the MoE rows and the reference rows, {key: (workdir, mode,
    options)} of the reference rows)."""
    engines = {}
    for dtype in FLAGS.dtypes:
        for name, opts in ENGINES.items():
            opts = dict(opts, capacity=FLAGS.capacity if opts["capacity"] is None else 0)
            engines[(dtype, name)] = build_engine(
                FLAGS.workdir, "moe_offload", store=f"experts_{dtype}", **opts
            )
    refs = {}  # (label, engine name) -> (workdir, mode, options): the reference rows
    if FLAGS.dense_workdir:
        refs[("-", "dense, in memory (reference)")] = (FLAGS.dense_workdir, "experts", {})
    if FLAGS.mole_workdir:
        refs[("float16", "MoLE-4E, LUT offloaded (reference)")] = (
            FLAGS.mole_workdir, "offload", dict(store="lut_float16"))  # fmt: skip
    for k, (w, mode, opts) in refs.items():
        engines[k] = build_engine(w, mode, **opts)
    return engines, refs


def main(_):
    stores(FLAGS.workdir)
    windows = np.concatenate(list(val_batches(FLAGS.workdir, n_batches=FLAGS.prompts)))
    prompts = windows[: FLAGS.prompts, : FLAGS.prompt]
    engines, refs = build_engines()
    for eng in engines.values():  # compile every shape once, untimed
        decode_s(eng, prompts[:1])
    times = {k: [] for k in engines}
    nbytes = {}
    for r in range(FLAGS.rounds):
        keys = list(engines)
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            if FLAGS.drop_cache and hasattr(engines[k], "store"):  # runs start from the disk
                drop_page_cache(engines[k].store.path)  # (posix_fadvise DONTNEED)
            t, b = decode_s(engines[k], prompts)
            times[k].append(t)
            nbytes[k] = b
    decoded = FLAGS.prompts * (FLAGS.new - 1)
    n = FLAGS.eval_batches
    mem = evaluate(FLAGS.workdir, "experts", n_batches=n, write=False)["loss"]
    loss = {d: evaluate(FLAGS.workdir, "moe_offload", n_batches=n, write=False, capacity=0,
                        store=f"experts_{d}")["loss"] for d in FLAGS.dtypes}  # fmt: skip
    loss.update({k: evaluate(w, mode, n_batches=n, write=False, **opts)["loss"]
                 for k, (w, mode, opts) in refs.items()})  # fmt: skip
    rows = []
    for (dtype, name), ts in times.items():
        rows.append(dict(
            dtype=dtype, engine=name, tokens_per_s=decoded / float(np.median(ts)),
            bytes_per_token=nbytes[(dtype, name)] / decoded,
            val_loss=loss[(dtype, name)] if (dtype, name) in refs else loss[dtype],
        ))  # fmt: skip
    print(f"\nin memory val loss {mem:.4f} ({n} batches); batch 1, capacity {FLAGS.capacity}")
    print(f"{'width':8} {'engine':34} {'tokens/s':>9} {'bytes/token':>12} {'val loss':>9}")
    for r in rows:
        print(f"{r['dtype']:8} {r['engine']:34} {r['tokens_per_s']:9.1f} "
              f"{r['bytes_per_token']:12,.0f} {r['val_loss']:9.4f}")  # fmt: skip
    meta = dict(in_memory_val_loss=mem, time=time.strftime("%Y-%m-%d %H:%M"))
    keys = (
        "workdir",
        "capacity",
        "prompts",
        "prompt",
        "new",
        "rounds",
        "eval_batches",
        "drop_cache",
    )
    meta.update({k: getattr(FLAGS, k) for k in keys})
    with open(FLAGS.json, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)


if __name__ == "__main__":
    app.run(main)
