"""Serving a pre-gated MoE's request queue (the shapes of Read-ME's Table 4 and Fig. 5).

Question: with every queued token's expert path known before the backbone runs, how many distinct
experts does a batch need under FIFO (decode-first), prefill-first and expert-aware batching
(Read-ME Algorithm 1), what per-token latency follows, and how often does a shared expert cache of
2-5 experts per layer hit under Random, LRU and Belady replacement?

    python experiments/bench_serving.py --workdir=runs/pregated-8e

Method. `--requests` prompts of `--min_prompt`..`--prompt` tokens from the run's held-out split
(lengths and queue order drawn from `--seed`), each generated greedily for 4..`--new` tokens by the
in-memory model; the pre-gating router gives every token's path (top-1). The queue is scheduled
into batches of at most `--budget` tokens (offload/serving.py); the batch sequence, its unique
experts and each cache's loads per batch are exact counts. Latency is a cost model with constants
measured here in the same run: `compute(n)`, the median time of the in-memory forward over n
held-out tokens (n rounded up to a power of two; decodes are timed as if they had no KV cache, so
compute is over-counted alike for every policy; it does not depend on which experts a batch uses,
so the latency columns differ only through expert loads and the order requests finish in), and
`load`, the median time to read one expert of one layer from the tensorstore expert store (fp16)
after `posix_fadvise(DONTNEED)` on the store's files. A batch that loads k experts per layer takes
load*k + (L-1)*max(compute/L, load*k) + compute/L: layer l+1's experts are read while layer l
computes (the exact prefetch pre-gating allows). Latency per token = the time a request's last
token is produced / its generated tokens, every request queued at time 0.

Executed (`--rounds` > 0): the same queue is then served for real by the lookahead engine
(offload/server.py) over the fp16 expert store, one shared cache of `--latency_capacity` experts
per layer evicted by LRU or by Belady over the queue's known future, pages dropped before each run,
every shape compiled by one untimed run first; latency is wall-clock. Each request runs its own
forward call within a batch (its rows sit at its own KV-cache position), so on this CPU a batch's
compute is the sum of its requests' and batching changes latency only through expert loads and
the order requests finish in. Medians over the rounds.
"""

from __future__ import annotations

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

from mole_jax.engine import build_engine
from mole_jax.evaluate import val_batches
from mole_jax.export import export_experts
from mole_jax.generate import generate
from mole_jax.offload import serving
from mole_jax.offload.expert_store import ExpertStore
from mole_jax.offload.policies import POLICIES as CACHES
from mole_jax.offload.policies import simulate
from mole_jax.offload.server import EVICTIONS, serve

flags.DEFINE_string("workdir", "runs/pregated-8e", "A trained pre-gated workdir.")
flags.DEFINE_integer("requests", 48, "Requests in the queue.")
flags.DEFINE_integer("prompt", 24, "Longest prompt (tokens).")
flags.DEFINE_integer("min_prompt", 8, "Shortest prompt (tokens).")
flags.DEFINE_integer("new", 16, "Most tokens generated per request.")
flags.DEFINE_integer("budget", 32, "Tokens per batch.")
flags.DEFINE_list("capacity", ["2", "3", "4", "5"], "Experts cached per layer.")
flags.DEFINE_integer("latency_capacity", 4, "Cache size of the latency rows.")
flags.DEFINE_integer("seed", 0, "Prompt lengths and queue order.")
flags.DEFINE_integer("rounds", 2, "Executed runs per batching x eviction (0: the model only).")
flags.DEFINE_string("json", "experiments/results/bench_serving.json", "Rows go here.")
FLAGS = flags.FLAGS


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


def executed(requests, prompts, store_dir) -> list[dict]:
    """Serves the queue for real under each batching x eviction, `--rounds` times, interleaved;
    the median of each measure over the rounds."""
    eng = build_engine(FLAGS.workdir, "lookahead", store=os.path.basename(store_dir),
                       capacity=FLAGS.latency_capacity)  # fmt: skip
    news = [r.new for r in requests]
    serve(eng, prompts, news, FLAGS.budget, "decode_first")  # compiles every shape, untimed
    runs = {}
    for _ in range(FLAGS.rounds):
        for policy in serving.POLICIES:
            for ev in EVICTIONS:
                eng.reset_stats()
                drop_page_cache(store_dir)
                out = serve(eng, prompts, news, FLAGS.budget, policy, ev)
                need = sum(len(t) for t in out["trace"])
                runs.setdefault((policy, ev), []).append(dict(
                    batches=len(out["batches"]), unique_experts=need / len(out["trace"]),
                    hit_rate=1 - sum(out["loads"]) / need, loads=sum(out["loads"]),
                    mean_ms=1e3 * float(out["latency_s"].mean()),
                    p95_ms=1e3 * float(np.percentile(out["latency_s"], 95)),
                    total_s=float(sum(out["seconds"])), plan_s=out["plan_s"],
                    offline_belady_hit=simulate(out["trace"], FLAGS.latency_capacity,
                                                "belady")["hit_rate"]))  # fmt: skip
    return [
        dict(
            batching=p, eviction=ev, **{k: float(np.median([r[k] for r in rs])) for k in rs[0]}
        )  # fmt: skip
        for (p, ev), rs in runs.items()
    ]


def compute_seconds(engine, sizes, windows) -> dict[int, float]:
    """Median seconds of the in-memory forward over n held-out tokens, for each n."""
    out = {}
    for n in sizes:
        ids = windows[:1, :n]
        jax.block_until_ready(engine.forward(ids)[0])  # compile
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            jax.block_until_ready(engine.forward(ids)[0])
            times.append(time.perf_counter() - t0)
        out[n] = float(np.median(times))
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


def batch_seconds(tokens: int, loads: int, compute, load: float, n_layers: int) -> float:
    n = 1 << max(0, tokens - 1).bit_length()
    c = compute[n] / n_layers
    ld = load * loads
    return ld + (n_layers - 1) * max(c, ld) + c


def main(_):
    rng = np.random.default_rng(FLAGS.seed)
    engine = build_engine(FLAGS.workdir, "experts")
    m = engine.model_config
    if m.kind != "pregated" or m.ffn.topk != 1 or len(m.ffn_layers) != m.n_layers:
        raise SystemExit(f"{FLAGS.workdir}: a pre-gated model, top-1, in every block is needed")
    store_dir = os.path.join(FLAGS.workdir, "experts_float16")
    fresh(ExpertStore, FLAGS.workdir, "experts_float16", lambda: export_experts(
        FLAGS.workdir, dtype="float16", out="experts_float16"))  # fmt: skip
    windows = np.concatenate(list(val_batches(FLAGS.workdir)), axis=0)
    requests, prompts = make_requests(engine, rng, windows)
    sizes = [1 << i for i in range((FLAGS.budget - 1).bit_length() + 1)]
    compute = compute_seconds(engine, sizes, windows)
    layers = [i for i in range(m.n_layers) if m.kind_of_layer(i) == m.kind]
    load = load_seconds(store_dir, m.ffn.experts, layers)
    rows = []
    for policy in serving.POLICIES:
        batches = serving.schedule(requests, FLAGS.budget, policy)
        trace = serving.trace_of(batches)
        row = dict(batching=policy, batches=len(batches),
                   unique_experts=float(np.mean([len(s) for s in trace])))  # fmt: skip
        for cap in map(int, FLAGS.capacity):
            for cache in CACHES:
                row[f"hit_{cache}_{cap}"] = simulate(trace, cap, cache)["hit_rate"]
        loads = simulate(trace, FLAGS.latency_capacity, "belady")["step_loads"]
        secs = [batch_seconds(sum(i.tokens for i in b), k, compute, load, len(layers))
                for b, k in zip(batches, loads, strict=True)]  # fmt: skip
        lat = serving.latencies(requests, batches, secs)
        row.update(mean_ms=1e3 * float(lat.mean()), p95_ms=1e3 * float(np.percentile(lat, 95)))
        rows.append(row)
    served = executed(requests, prompts, store_dir) if FLAGS.rounds else []
    report(rows, compute, load, requests, served)


def report(rows, compute, load, requests, served):
    caps = list(map(int, FLAGS.capacity))
    print(f"\n{len(requests)} requests, budget {FLAGS.budget} tokens, paths from the router; "
          f"load {1e3 * load:.3f} ms per expert per layer (pages dropped), compute "
          + ", ".join(f"{n}: {1e3 * s:.2f}" for n, s in compute.items()) + " ms")  # fmt: skip
    print(
        f"\n| batching | batches | unique experts / batch | mean ms / token | p95 ms / token "
        f"(Belady, {FLAGS.latency_capacity} cached) |\n|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['batching']} | {r['batches']} | {r['unique_experts']:.2f} | "
            f"{r['mean_ms']:.2f} | {r['p95_ms']:.2f} |"
        )
    for r in rows:
        print(f"\nhit ratio, {r['batching']} batches\n\n| capacity | "
              + " | ".join(CACHES) + " |\n|---|" + "---|" * len(CACHES))  # fmt: skip
        for cap in caps:
            print(f"| {cap} | " + " | ".join(f"{r[f'hit_{c}_{cap}']:.3f}" for c in CACHES) + " |")
    if served:
        print(
            f"\nexecuted (wall clock, {FLAGS.latency_capacity} experts cached per layer, "
            f"median of {FLAGS.rounds} rounds)\n\n| batching | eviction | batches | unique "
            "experts / batch | hit ratio (offline Belady) | experts loaded | mean ms / token | "
            "p95 ms / token | total s (planning) |\n|---|---|---|---|---|---|---|---|---|"
        )
        for r in served:
            print(f"| {r['batching']} | {r['eviction']} | {r['batches']:.0f} | "
                  f"{r['unique_experts']:.2f} | {r['hit_rate']:.3f} "
                  f"({r['offline_belady_hit']:.3f}) | {r['loads']:.0f} | {r['mean_ms']:.2f} | "
                  f"{r['p95_ms']:.2f} | {r['total_s']:.2f} ({r['plan_s']:.2f}) |")  # fmt: skip
    names = ("workdir", "requests", "min_prompt", "prompt", "new", "budget", "capacity",
             "latency_capacity", "seed", "rounds")  # fmt: skip
    out = dict(flags={k: FLAGS[k].value for k in names}, compute_s=compute, load_s=load, rows=rows,
               executed=served)  # fmt: skip
    Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.json).write_text(json.dumps(out, indent=1))
    print(f"\nwrote {FLAGS.json}")


if __name__ == "__main__":
    app.run(main)
