"""Decoding with the routed experts in object storage: a round trip per token against one per layer.

Question (issue 29; MoLE's premise): a MoLE model's LUT row for a token holds every layer's
expert outputs, so with the LUT in object storage a decode step costs one round trip; an
offloaded MoE learns a layer's experts only from that layer's hidden state, so it pays up to one
round trip per MoE layer. Target at 20 ms added delay: MoLE <= 1.3 x (one round trip + its
in-memory decode step) per token.

    python experiments/bench_remote.py [--size=tiny] [--train_steps=200] [--batches=1,8]
        [--delays_ms=0,5,20] [--new=16] [--rounds=3]

Models: bench_offload.py's dense, MoE-10E top-2 and MoLE-4E at --size (trained under --root if
missing). Stores: MoLE's fp16 LUT exported `packed` (a token's rows of every layer in one read)
and MoE's fp16 experts, each in a folder, on moto's S3 server (a process on 127.0.0.1) and behind
a Range-capable HTTP server on 127.0.0.1 that waits --delays_ms before answering each request
(the added round trip; `_servers.py`). Rows: dense in memory, MoLE with its LUT in memory, MoLE
offloaded cold (no row cache, and its store reopened before every decode step, untimed, so that
tensorstore's cache holds the shard indexes and no rows: every token's row comes from storage),
MoE offloaded with its per-layer LRU of --capacity experts (the baseline as it runs) and cold
(no cache, store reopened every step), each offloaded row on every store.

Method: prompts are validation windows; per engine one untimed decode compiles every shape, then
--rounds decodes of --new tokens, round-robin over the engines, each from empty caches. Per
decode step: median and p95 over the rounds' steps (blocked on the logits). Requests and bytes
per token: tensorstore's counters over the timed steps / the tokens they fed (a request is a
round trip; neighbouring rows can share one). A store's round trip: the median of 20 one-byte
reads of its manifest; the target is checked against it (1.3 x (round trip + the in-memory LUT's
step)), not against the added delay alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import _paths  # noqa: F401
import bench_offload as bo
import numpy as np
import tensorstore as ts
from _servers import http_server, s3_server
from absl import app, flags

from mole_jax.eval.validation import val_batches
from mole_jax.infer.engine import build_engine
from mole_jax.infer.export import export_experts, export_lut
from mole_jax.infer.generate import generate
from mole_jax.stores.experts import ExpertStore
from mole_jax.stores.location import context, io_counters, io_since, location
from mole_jax.stores.lut import LutStore

flags.DEFINE_list("delays_ms", ["0", "5", "20"], "Round-trip delays added by the HTTP server.")
flags.DEFINE_string("json", "experiments/results/bench_remote.json", "Rows go here.")
FLAGS = flags.FLAGS
LUT, EXPERTS = "lut_packed", "experts_float16"


def stores(dirs: dict, http: dict[str, str]) -> dict[str, tuple[str, str]]:
    """{store label: (MoLE LUT location, MoE experts location)}; exports the local ones and the
    S3 copies (the HTTP servers serve the local folders)."""
    out = {"folder": (f"{dirs['mole']}/{LUT}", f"{dirs['moe']}/{EXPERTS}")}
    for w, fn, name in ((dirs["mole"], export_lut, LUT), (dirs["moe"], export_experts, EXPERTS)):
        opts = dict(layout="packed") if fn is export_lut else {}
        fn(w, dtype="float16", out=name, **opts)
        fn(w, dtype="float16", out=f"s3://stores/{Path(w).name}/{name}", **opts)
    out["s3 (moto)"] = tuple(f"s3://stores/{Path(dirs[k]).name}/{n}"
                             for k, n in (("mole", LUT), ("moe", EXPERTS)))  # fmt: skip
    root = Path(dirs["mole"]).parent
    for delay, url in http.items():
        rel = [Path(dirs[k]).relative_to(root) for k in ("mole", "moe")]
        out[f"http +{delay} ms"] = (f"{url}/{rel[0]}/{LUT}", f"{url}/{rel[1]}/{EXPERTS}")
    return out


def engines(dirs: dict, where: dict) -> list[tuple[str, str, str | None, object]]:
    """(row, store label, store location or None, engine) of every row; a row with a location
    reopens its store before every decode step (`decode`)."""
    rows = [("dense", "memory", None, build_engine(dirs["dense"])),
            ("MoLE-4E LUT in memory", "memory", None,
             build_engine(dirs["mole"], "lut_memory", store=where["folder"][0]))]  # fmt: skip
    for label, (lut, experts) in where.items():
        rows.append(("MoLE-4E offloaded", label, lut,
                     build_engine(dirs["mole"], "offload", store=lut, cache_rows=0)))  # fmt: skip
        rows.append((f"MoE-10E offloaded, LRU {FLAGS.capacity}/layer", label, None,
                     build_engine(dirs["moe"], "moe_offload", store=experts,
                                  capacity=FLAGS.capacity)))  # fmt: skip
        cold = build_engine(dirs["moe"], "moe_offload", store=experts, capacity=0)
        rows.append(("MoE-10E offloaded, no cache", label, experts, cold))
    return rows


def _cold(engine, where: str) -> None:
    """A freshly opened store in the engine: tensorstore's cache holds the shard indexes (read
    now) and no rows or experts."""
    if isinstance(engine.store, LutStore):
        engine.rows.store = LutStore.open(where, verify="none")
        engine.rows.store.read_packed(np.array([engine.model_config.vocab_size - 1]))
    else:
        engine.store = ExpertStore.open(where, verify="none")
        for layer in engine.store.layers:
            engine.store.start_read(layer, 0).result()


def decode(engine, where: str | None, prompts) -> tuple[list[float], int, int]:
    """One timed decode from empty caches: (step seconds, requests, bytes) of the decode steps.
    With `where`, the store is reopened before every step (untimed, uncounted): every token's
    row, every expert, comes from storage."""
    engine.reset_stats()
    io, mark = [0, 0], {}

    def count() -> None:
        if "io" in mark:
            requests, nbytes = io_since(mark["io"])
            io[0], io[1] = io[0] + requests, io[1] + nbytes

    def before(t):
        if t == 0:
            return
        count()
        if where is not None:
            _cold(engine, where)
        mark["io"] = io_counters()

    out = generate(engine, prompts, FLAGS.new, before_step=before)
    count()
    return out["step_s"], io[0], io[1]


def round_trip_ms(where: str) -> float:
    """Median time of a one-byte read of the store's manifest (20 reads)."""
    kv = ts.KvStore.open(location(where).kvstore(), context=context()).result()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        kv.read("manifest.json", byte_range=slice(0, 1)).result()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def measure(rows, windows, batch: int) -> list[dict]:
    prompts = windows[:batch, : FLAGS.prompt]
    for _, _, where, eng in rows:  # compiles every shape
        decode(eng, where, prompts)
    steps = {i: [] for i in range(len(rows))}
    io = {i: [0, 0] for i in range(len(rows))}
    for r in range(FLAGS.rounds):
        p = windows[(r + 1) * batch : (r + 2) * batch, : FLAGS.prompt]
        for i, (_, _, where, eng) in enumerate(rows):
            s, req, nbytes = decode(eng, where, p)
            steps[i] += s
            io[i][0] += req
            io[i][1] += nbytes
    tokens = FLAGS.rounds * batch * (FLAGS.new - 1)
    return [dict(model=name, store=label, batch=batch,
                 step_ms=1e3 * float(np.median(steps[i])),
                 p95_ms=1e3 * float(np.percentile(steps[i], 95)),
                 requests_per_token=io[i][0] / tokens, bytes_per_token=io[i][1] / tokens)
            for i, (name, label, _, _) in enumerate(rows)]  # fmt: skip


def main(_):
    dirs = bo.ensure_models(Path(FLAGS.root), FLAGS.size, FLAGS.train_steps)
    windows = np.concatenate(list(val_batches(dirs["mole"])), axis=0)
    results = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(s3_server("stores"))
        http = {d: stack.enter_context(http_server(Path(dirs["mole"]).parent, float(d) / 1e3))[0]
                for d in FLAGS.delays_ms}  # fmt: skip
        where = stores(dirs, http)
        rtt = {label: round_trip_ms(lut) for label, (lut, _) in where.items()}
        rows = engines(dirs, where)
        for batch in map(int, FLAGS.batches):
            results += measure(rows, windows, batch)
    for r in results:
        r["round_trip_ms"] = rtt.get(r["store"], 0.0)
    report(results)


def report(results: list[dict]) -> None:
    from _tables.bench import remote_table

    print(remote_table(results))
    names = ("size", "train_steps", "root", "batches", "prompt", "new", "rounds", "capacity",
             "delays_ms")  # fmt: skip
    out = dict(flags={k: FLAGS[k].value for k in names}, cpu=os.cpu_count(), rows=results)
    Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.json).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {FLAGS.json}")


if __name__ == "__main__":
    FLAGS.set_default("size", "tiny")
    FLAGS.set_default("root", "runs/bench_remote")
    FLAGS.set_default("batches", ["1", "8"])
    FLAGS.set_default("new", 16)
    FLAGS.set_default("rounds", 3)
    FLAGS.set_default("prompt", 32)
    app.run(main)
