"""Compile time, step time and step memory of scanned layers against the layer loop.

Question: what does `model.scan_layers` buy (compile time that stops growing with depth) and what
does it cost (step time; the transient stacked copy of the blocks' weights) for dense, MoE-10E
and MoLE-4E?

    python experiments/bench_scan.py [--sizes=small,160m] [--steps=3] [--json=...]

Method: for each size and kind, the train step built by `trainer.setup` with the layer loop and
with scanned layers, side by side in one run: lowering + XLA compilation timed from the abstract
state (nothing allocated), XLA's `memory_analysis()` of the compiled step (temporaries and
arguments, bytes), then the median of `--steps` steps on real batches of the default corpus,
timed on a second pass over the same batches (the first compiles every MoLE table size they
need); the loss is that of the second pass's last step. The vocabulary is 8,192 and the batch
small (`--batch`, `--seq_len`) so that paper depths compile and step on a CPU; depth and width
are the size's own.
"""

from __future__ import annotations

import json
import time

import _paths  # noqa: F401
import jax
import numpy as np
from _kinds import KINDS
from _tables.guide import scan_table
from absl import app, flags, logging

from mole_jax.data import pipeline
from mole_jax.train import trainer

flags.DEFINE_list("sizes", ["small", "160m"], "Model sizes.")
flags.DEFINE_list("kinds", ["dense", "moe-10e", "mole-4e"], "Rows.")
flags.DEFINE_integer("steps", 3, "Timed steps (0: compile only).")
flags.DEFINE_integer("batch", 2, "Sequences per step.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
flags.DEFINE_string("json", "experiments/results/bench_scan.json", "Write the rows here.")
FLAGS = flags.FLAGS


def config(kind: str, size: str, scan: bool):
    cfg = KINDS[kind](size)
    cfg.model.update(dict(scan_layers=scan, vocab_size=8192))
    cfg.data.update(dict(vocab_size=8192, seq_len=FLAGS.seq_len))
    chunk = cfg.train.loss_chunk  # (512 from 160m up: kept where it divides the sequence)
    chunk = chunk if FLAGS.seq_len % max(chunk, 1) == 0 else 0
    cfg.train.update(dict(batch_size=FLAGS.batch, microbatches=1, loss_chunk=chunk))
    return cfg


def measure(cfg) -> dict:
    tr = trainer.setup(cfg)
    td = pipeline.prepare(cfg)
    batches = [pipeline.train_batch(td.train, cfg.seed, s, FLAGS.batch, FLAGS.seq_len)
               for s in range(max(FLAGS.steps, 1))]  # fmt: skip
    t0 = time.perf_counter()
    lowered = tr.step_fn.lower(tr.abstract_state, *tr.put_batch(batches[0]))
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    row = dict(n_layers=cfg.model.n_layers, compile_s=compile_s, temp_bytes=mem.temp_size_in_bytes,
               argument_bytes=mem.argument_size_in_bytes)  # fmt: skip
    if FLAGS.steps:  # a first untimed pass compiles every size of MoLE's table the batches need
        state = tr.init_state()
        for _pass in ("compile", "timed"):
            times = []
            for b in batches:
                args = tr.put_batch(b)
                t0 = time.perf_counter()
                state, m = tr.step_fn(state, *args)
                jax.block_until_ready((state, m))
                times.append(time.perf_counter() - t0)
        row.update(step_s=float(np.median(times)), final_loss=float(m["loss"]))
    return row


def main(_):
    logging.set_verbosity(logging.WARNING)
    measure(config("dense", "tiny", False))  # jax's own start-up, outside the first row
    rows = []
    for size in FLAGS.sizes:
        for kind in FLAGS.kinds:
            row = dict(size=size, kind=kind)
            for name, scan in (("loop", False), ("scan", True)):
                row[name] = measure(config(kind, size, scan))
                print(f"  {size} {kind} {name}: {row[name]}", flush=True)
            rows.append(row)
    print(scan_table(rows))
    print(f"batch {FLAGS.batch} x {FLAGS.seq_len} tokens, vocabulary 8192, "
          f"{jax.device_count()} {jax.default_backend()} device(s)")  # fmt: skip
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(dict(batch=FLAGS.batch, seq_len=FLAGS.seq_len, rows=rows), f, indent=2)


if __name__ == "__main__":
    app.run(main)
