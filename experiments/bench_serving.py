"""Serving a pre-gated MoE's request queue (the shapes of Read-ME's Table 4 and Fig. 5).

Question: with every queued token's expert path known before the backbone runs, how many distinct
experts does a batch need under FIFO (decode-first), prefill-first and expert-aware batching
(Read-ME Algorithm 1), what per-token latency follows, and how often does a shared expert cache of
2-5 experts per layer hit under Random, LRU and Belady replacement?

    python experiments/bench_serving.py --workdir=runs/pregated-8e

Method. `--requests` prompts of `--min_prompt`..`--prompt` tokens from the run's held-out split
(lengths and queue order drawn from `--seed`), each generated greedily for 4..`--new` tokens by the
in-memory model; the pre-gating router gives every token's path (top-1). Hit ratios: the queue,
every request in it at time 0, is scheduled into batches of at most `--budget` tokens
(mole_jax/infer/offload/serving.py) and the batch sequence is replayed through each cache
(exact counts).

Modelled latency (`serving.replay`, one row per `--load` x batching): requests arrive as a
Poisson stream in queue order, at `--load` times the rate FIFO sustains on this queue (its
requests / its busy time with every request queued at time 0; load inf: all at time 0, a
backlog; Read-ME replays Chatbot Arena arrivals); the shared cache of `--latency_capacity`
experts is evicted online by Belady over the known future; each batch lasts what a cost model says,
with constants measured here in the same run: `compute(n, k)`, the median time of one jitted
forward over n held-out tokens (n rounded up to a power of two) routed onto k experts: the router,
each block's attention and its grouped matmul over the experts the lookahead engine hands in for
k experts (padded to a power of two), the head: a batch run as one call (decodes are timed
without a KV cache, alike for every policy); and `load`, the median time to read one
expert of one layer from the fp16 tensorstore store after `posix_fadvise(DONTNEED)` on its
files. A batch that loads j experts per layer takes load*j + (L-1)*max(c, load*j) + c, c =
compute(n, k)/L: layer l+1's experts are read while layer l computes (pre-gating's exact
prefetch). Latency per token = (the time a request's last token is produced - its arrival) / its
generated tokens (Read-ME's metric).

Executed (`--rounds` > 0): the same queue is then served for real by the lookahead engine
(mole_jax/infer/offload/server.py) over the fp16 expert store at each `--executed_load` (arrival
rate from a timed time-0 FIFO run, the same Poisson draws), one shared cache of `--latency_capacity`
experts per layer evicted by LRU or by Belady over the queue's known future, pages dropped before
each run, every shape compiled by one untimed run first; latency is wall-clock. A batch runs as one
(`forward_batch`): attention per request (its rows sit at its own KV-cache position), each block's
experts once over all the batch's tokens, a grouped matmul over the experts it uses. Medians over
the rounds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import _paths  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np
from _stores import drop_page_cache, fresh
from absl import app, flags
from flax import nnx

from mole_jax.eval.validation import val_batches
from mole_jax.infer.engine import build_engine
from mole_jax.infer.export import export_experts
from mole_jax.infer.generate import generate
from mole_jax.infer.offload import serving
from mole_jax.infer.offload.policies import POLICIES as CACHES
from mole_jax.infer.offload.policies import simulate
from mole_jax.infer.offload.server import EVICTIONS, serve
from mole_jax.stores.experts import ExpertStore

flags.DEFINE_string("workdir", "runs/pregated-8e", "A trained pre-gated workdir.")
flags.DEFINE_integer("requests", 48, "Requests in the queue.")
flags.DEFINE_integer("prompt", 24, "Longest prompt (tokens).")
flags.DEFINE_integer("min_prompt", 8, "Shortest prompt (tokens).")
flags.DEFINE_integer("new", 16, "Most tokens generated per request.")
flags.DEFINE_integer("budget", 32, "Tokens per batch.")
flags.DEFINE_list("capacity", ["2", "3", "4", "5"], "Experts cached per layer.")
flags.DEFINE_integer("latency_capacity", 4, "Cache size of the latency rows.")
flags.DEFINE_integer("seed", 0, "Prompt lengths and queue order.")
flags.DEFINE_list(
    "load",
    ["0.5", "0.95", "1.5", "3", "inf"],
    "Offered loads of the modelled stream: x the requests/s FIFO sustains on the queue "
    "(inf: every request at time 0).",
)
flags.DEFINE_list("executed_load", ["1.5", "inf"], "Offered loads of the executed stream.")
flags.DEFINE_integer("rounds", 2, "Executed runs per batching x eviction (0: the model only).")
flags.DEFINE_string("json", "experiments/results/bench_serving.json", "Rows go here.")
FLAGS = flags.FLAGS


def _loads_ok(values) -> bool:
    try:
        return all(float(v) > 0 for v in values)
    except ValueError:
        return False


for _name in ("load", "executed_load"):
    flags.register_validator(_name, _loads_ok, message="loads are numbers > 0 (inf: time 0)")


def make_requests(engine, rng, windows) -> tuple[list[serving.Request], list[np.ndarray]]:
    pick = rng.permutation(len(windows))[: FLAGS.requests]
    prompts = []
    model = nnx.merge(engine.graphdef, engine.params, engine.rest)
    route = jax.jit(lambda ids: model.router(ids, jnp.arange(ids.shape[1]))[0].experts_TxK[:, 0])
    out = []
    for rid, w in enumerate(pick):
        p = int(rng.integers(FLAGS.min_prompt, FLAGS.prompt + 1))
        new = int(rng.integers(4, FLAGS.new + 1))
        prompt = windows[w][None, :p]
        gen = generate(engine, prompt, new)["tokens"]
        ids = np.concatenate([prompt, gen], axis=1)
        out.append(serving.Request(rid, tuple(np.asarray(route(ids)).tolist()), p, new))
        prompts.append(prompt[0])
    return out, prompts


def arrivals(n: int, busy_s: float, load: str) -> np.ndarray:
    """The stream's arrival times: Poisson at `load` x n / busy_s requests per second, the first
    at 0 (load inf: all at 0)."""
    rho = float(load)  # > 0: checked when the flags are parsed
    if rho == float("inf"):
        return np.zeros(n)
    gaps = np.random.default_rng([FLAGS.seed, 1]).exponential(busy_s / n / rho, n)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])])


def executed(requests, prompts, store_dir) -> list[dict]:
    """Serves the queue for real under each `--executed_load` x batching x eviction, `--rounds`
    times, interleaved; the median of each measure over the rounds. A load's arrival rate is
    that fraction of what FIFO sustained on the time-0 queue in an untimed-for-results first run."""
    eng = build_engine(FLAGS.workdir, "lookahead", store=os.path.basename(store_dir),
                       capacity=FLAGS.latency_capacity)  # fmt: skip
    news = [r.new for r in requests]
    eng.compile_batches(FLAGS.budget)  # every batch shape the stream may form
    for policy in serving.POLICIES:  # every request's own shapes; untimed
        serve(eng, prompts, news, FLAGS.budget, policy)
    eng.reset_stats()
    drop_page_cache(store_dir)
    fifo_s = sum(serve(eng, prompts, news, FLAGS.budget, "decode_first")["seconds"])
    runs = {}
    for _ in range(FLAGS.rounds):
        for rho in FLAGS.executed_load:
            at = arrivals(len(requests), fifo_s, rho)
            for policy in serving.POLICIES:
                for ev in EVICTIONS:
                    eng.reset_stats()
                    drop_page_cache(store_dir)
                    out = serve(eng, prompts, news, FLAGS.budget, policy, ev, arrivals=at)
                    best = simulate(out["trace"], FLAGS.latency_capacity, "belady")["hit_rate"]
                    row = dict(_row(out), plan_s=out["plan_s"], offline_belady_hit=best)
                    runs.setdefault((rho, policy, ev), []).append(row)
    return [
        dict(
            load=rho,
            batching=p,
            eviction=ev,
            **{k: float(np.median([r[k] for r in rs])) for k in rs[0]},
        )  # fmt: skip
        for (rho, p, ev), rs in runs.items()
    ]


def _row(out) -> dict:
    """What a served stream (`server.serve` or `serving.replay`) measured."""
    need = sum(len(t) for t in out["trace"])
    return dict(batches=len(out["batches"]), unique_experts=need / len(out["trace"]),
                hit_rate=1 - sum(out["loads"]) / need, loads=sum(out["loads"]),
                mean_ms=1e3 * float(out["latency_s"].mean()),
                p95_ms=1e3 * float(np.percentile(out["latency_s"], 95)),
                busy_s=float(sum(out["seconds"])))  # fmt: skip


def compute_seconds(
    store: str, sizes, n_experts: int, windows, exact: bool = False
) -> dict[int, dict[int, float]]:
    """{n: {k: median seconds of one jitted forward over n held-out tokens routed onto k
    experts}}: the router, each block's attention and its grouped matmul over the experts the
    lookahead engine hands in for k experts (S padded to a power of two; `exact`: S = k, one
    compile per k), the head; token t on expert t mod k. A batch of n tokens on k experts run as
    one call."""
    eng = build_engine(FLAGS.workdir, "lookahead", store=store, capacity=n_experts)
    eng.exact_slots = exact
    s, layers = eng.staged, sorted(eng.moe_layers)

    def one_call(p, r, ids, local, ups, downs):
        model = s.merge(p, r)
        pos = jnp.arange(ids.shape[1])
        h, w = model.embed_ids(ids), model.router(ids, pos)[0].weights_TxK
        for i, block in enumerate(model.blocks):
            a, x, _ = block.attend(h, pos, None, None)
            h = a + block.ffn.apply_experts(x, w, local, ups[i], downs[i])
        return model.logits(h)

    run, out = jax.jit(one_call), {}
    for n in sizes:
        ids = jnp.asarray(windows[:1, :n])
        for k in range(1, min(n, n_experts) + 1):
            experts = np.arange(n)[:, None] % k
            eng.begin_batch(range(k))
            held = [eng.load(i, experts, None) for i in layers]  # the engine's own hand-in
            eng.end_batch()
            args = (s.params, s.rest, ids, held[0][0], [h[1] for h in held], [h[2] for h in held])
            jax.block_until_ready(run(*args))  # compiles
            times = []
            for _ in range(9):
                t0 = time.perf_counter()
                jax.block_until_ready(run(*args))
                times.append(time.perf_counter() - t0)
            out.setdefault(n, {})[k] = float(np.median(times))
    return out


def load_seconds(store_dir: str, n_experts: int, layers: list[int]) -> float:
    """Median time to read one expert of one layer with the store's pages out of the OS cache."""
    times = []
    for _ in range(3):
        drop_page_cache(store_dir)
        store = ExpertStore.open(store_dir)
        for layer in layers:
            for e in range(n_experts):
                t0 = time.perf_counter()
                store.start_read(layer, e).result()
                times.append(time.perf_counter() - t0)
    return float(np.median(times))


def batch_seconds(tokens: int, unique: int, loads: int, compute, load: float, n_layers: int):
    n = 1 << max(0, tokens - 1).bit_length()
    c = compute[n][min(unique, n)] / n_layers
    ld = load * loads
    return ld + (n_layers - 1) * max(c, ld) + c


def hit_rows(requests) -> list[dict]:
    """Per batching: the time-0 schedule's batches, unique experts, and each cache's hit ratio."""
    rows = []
    for policy in serving.POLICIES:
        trace = serving.trace_of(serving.schedule(requests, FLAGS.budget, policy))
        row = dict(batching=policy, batches=len(trace),
                   unique_experts=float(np.mean([len(s) for s in trace])))  # fmt: skip
        for cap in map(int, FLAGS.capacity):
            for cache in CACHES:
                row[f"hit_{cache}_{cap}"] = simulate(trace, cap, cache)["hit_rate"]
        rows.append(row)
    return rows


def modelled(requests, cost) -> list[dict]:
    """Per offered load x batching: the stream replayed on the cost model (module docstring)."""

    def run(reqs, policy):
        return serving.replay(reqs, FLAGS.budget, policy, cost, FLAGS.latency_capacity)

    fifo_s = run(requests, "decode_first")["end"][-1]  # its busy time on the time-0 queue
    rows = []
    for rho in FLAGS.load:
        at = arrivals(len(requests), fifo_s, rho)
        reqs = [dataclasses.replace(r, arrival=float(a)) for r, a in zip(requests, at, strict=True)]
        for policy in serving.POLICIES:
            rows.append(dict(load=rho, batching=policy, **_row(run(reqs, policy))))
    return rows


def setup():
    """(in-memory engine, held-out windows, batch sizes a budget forms, MoE layers, one expert's
    read time): the workdir checked, its fp16 expert store exported unless current."""
    engine = build_engine(FLAGS.workdir, "experts")
    m = engine.model_config
    if m.kind != "pregated" or m.ffn.topk != 1 or len(m.ffn_layers) != m.n_layers:
        raise SystemExit(f"{FLAGS.workdir}: a pre-gated model, top-1, in every block is needed")
    fresh(ExpertStore, FLAGS.workdir, "experts_float16", lambda: export_experts(
        FLAGS.workdir, dtype="float16", out="experts_float16"))  # fmt: skip
    windows = np.concatenate(list(val_batches(FLAGS.workdir)), axis=0)
    sizes = [1 << i for i in range((FLAGS.budget - 1).bit_length() + 1)]
    layers = [i for i in range(m.n_layers) if m.kind_of_layer(i) == m.kind]
    load = load_seconds(os.path.join(FLAGS.workdir, "experts_float16"), m.ffn.experts, layers)
    return engine, windows, sizes, layers, load


def main(_):
    engine, windows, sizes, layers, load = setup()
    m = engine.model_config
    requests, prompts = make_requests(engine, np.random.default_rng(FLAGS.seed), windows)
    compute = compute_seconds("experts_float16", sizes, m.ffn.experts, windows)
    store_dir = os.path.join(FLAGS.workdir, "experts_float16")
    rows = hit_rows(requests)
    model = modelled(requests, lambda t, u, j: batch_seconds(t, u, j, compute, load, len(layers)))
    served = executed(requests, prompts, store_dir) if FLAGS.rounds else []
    report(rows, model, compute, load, requests, served)


def report(rows, model, compute, load, requests, served):
    caps = list(map(int, FLAGS.capacity))
    print(f"\n{len(requests)} requests, budget {FLAGS.budget} tokens, paths from the router; "
          f"load {1e3 * load:.3f} ms per expert per layer (pages dropped); compute ms "
          "(n tokens: k = 1 .. experts) "
          + "; ".join(f"{n}: " + " ".join(f"{1e3 * s:.2f}" for s in ks.values())
                      for n, ks in compute.items()))  # fmt: skip
    print(f"\nmodelled (online Belady, {FLAGS.latency_capacity} cached)\n\n| load | batching | "
          "batches | unique experts / batch | hit ratio | busy s | mean ms / token | p95 ms / "
          "token |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in model:
        print(f"| {r['load']} | {r['batching']} | {r['batches']} | {r['unique_experts']:.2f} | "
              f"{r['hit_rate']:.3f} | {r['busy_s']:.3f} | {r['mean_ms']:.2f} | "
              f"{r['p95_ms']:.2f} |")  # fmt: skip
    print("\n| batching (time 0) | batches | unique experts / batch |\n|---|---|---|")
    for r in rows:
        print(f"| {r['batching']} | {r['batches']} | {r['unique_experts']:.2f} |")
    for r in rows:
        print(f"\nhit ratio, {r['batching']} batches\n\n| capacity | "
              + " | ".join(CACHES) + " |\n|---|" + "---|" * len(CACHES))  # fmt: skip
        for cap in caps:
            print(f"| {cap} | " + " | ".join(f"{r[f'hit_{c}_{cap}']:.3f}" for c in CACHES) + " |")
    if served:
        print(
            f"\nexecuted (wall clock, {FLAGS.latency_capacity} experts cached per layer, "
            f"median of {FLAGS.rounds} rounds)\n\n| load | batching | eviction | batches | "
            "unique experts / batch | hit ratio (offline Belady) | experts loaded | mean ms / "
            "token | p95 ms / token | busy s (planning) |\n" + "|---" * 10 + "|"
        )
        for r in served:
            print(f"| {r['load']} | {r['batching']} | {r['eviction']} | {r['batches']:.0f} | "
                  f"{r['unique_experts']:.2f} | {r['hit_rate']:.3f} "
                  f"({r['offline_belady_hit']:.3f}) | {r['loads']:.0f} | {r['mean_ms']:.2f} | "
                  f"{r['p95_ms']:.2f} | {r['busy_s']:.2f} ({r['plan_s']:.2f}) |")  # fmt: skip
    names = ("workdir", "requests", "min_prompt", "prompt", "new", "budget", "capacity",
             "latency_capacity", "seed", "load", "executed_load", "rounds")  # fmt: skip
    out = dict(flags={k: FLAGS[k].value for k in names}, compute_s=compute, load_s=load, rows=rows,
               modelled=model, executed=served)  # fmt: skip
    Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.json).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {FLAGS.json}")


if __name__ == "__main__":
    app.run(main)
