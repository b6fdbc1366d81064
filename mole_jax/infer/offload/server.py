"""Serving a queue of requests on the lookahead engine (Read-ME's serving loop, executed).

Each request joins the queue at its arrival time (all at time 0 by default) with its prompt and
the number of tokens to generate (greedy). The pre-gating router gives each prompt token's path
at once, and each generated token's path as soon as the token exists (the router is causal and
runs on token ids only), so the queue's ready items are always known with their experts. Each step:

1. a batch of at most `budget` tokens is picked from the ready items by the batching policy
   (`serving.pick`: decode-first, prefill-first or expert-aware, Read-ME Algorithm 1);
2. the engine starts reading every expert the batch needs that its shared cache lacks, in every
   layer at once (`LookaheadEngine.begin_batch`: exact prefetch), and the batch runs as one
   (`LookaheadEngine.forward_batch`): each request's router and attention against its own KV
   cache (rows of different requests sit at different positions), each block's experts once over
   all the batch's tokens, a grouped matmul over the experts the batch uses;
3. the cache is brought back to `capacity` experts per layer by LRU, or by Belady over the
   queue's known future: the batches the ready items would form next (`serving.known_future`;
   decodes whose tokens do not exist yet are not in it).

Wall-clock time is measured from the start of serving (the prompts' first router pass and their
KV caches are set up before it; every later router pass and Belady's planning are included, and
`plan_s` says how much of it was planning): a request's latency per token is the time from its
arrival to its last token / its generated tokens (Read-ME's metric).
"""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from mole_jax.errors import UserError
from mole_jax.infer.offload import serving
from mole_jax.infer.offload.moe import bucket

EVICTIONS = ("lru", "belady")


@dataclasses.dataclass
class _Live:
    ids: list[int]  # the prompt, then the generated tokens
    prompt: int
    new: int
    paths: list[int]  # the route of every token in ids so far
    cache: object

    def item(self, rid: int, step: int) -> serving.Item:
        if step == 0:
            return serving.Item(rid, 0, tuple(self.paths[: self.prompt]))
        return serving.Item(rid, step, (self.paths[self.prompt + step - 1],))


def serve(
    engine, prompts, news, budget: int, policy: str, eviction: str = "belady", arrivals=None
) -> dict:
    """Serves every request (prompt i, news[i] tokens, ready `arrivals[i]` seconds after the
    start; default all at once) through `engine` (a LookaheadEngine of a top-1 pre-gated model).
    Returns the generated tokens per request, the batches (items), the trace (experts per batch),
    per-batch loads, seconds and start times, and per-request latency per token from its
    arrival."""
    m = engine.model_config
    _check(m, prompts, news, budget, eviction)
    route = _router(engine, max(len(p) + n for p, n in zip(prompts, news, strict=True)))
    seqs = [[int(t) for t in p] for p in prompts]
    live = {
        rid: _Live(ids, len(ids), int(n), paths, engine.init_cache(1, len(ids) + n))
        for rid, (ids, n, paths) in enumerate(zip(seqs, news, route(seqs), strict=True))
    }
    at = np.zeros(len(live)) if arrivals is None else np.asarray(arrivals, float)
    queue = serving.Stream(
        [serving.Request(rid, (), r.prompt, r.new, at[rid]) for rid, r in live.items()],
        lambda rid, step: live[rid].item(rid, step),
    )
    out = dict(batches=[], trace=[], loads=[], seconds=[], start=[], plan_s=0.0)
    last_use = {e: -1 for c in engine.cache.values() for e in c}  # lru keys of what is resident
    done, start = {}, time.perf_counter()

    def ready():
        queue.admit(time.perf_counter() - start)
        return queue.ready()

    while not queue.done:
        prefills, decodes = ready()
        if not (prefills or decodes):
            time.sleep(max(0.0, queue.next_arrival() - (time.perf_counter() - start)))
            continue
        batch = serving.pick(prefills, decodes, budget, policy)
        need = serving.trace_of([batch])[0]
        resident = set(next(iter(engine.cache.values()), {}))
        t0 = time.perf_counter()
        _run_batch(engine, batch, need, live, route, len(need - resident))
        queue.advance(batch)
        last_use.update(dict.fromkeys(need, len(out["batches"])))
        t1 = time.perf_counter()
        keys = last_use if eviction == "lru" else serving.next_uses_of(serving.known_future(
            *ready(), budget, policy), range(m.ffn.experts))  # fmt: skip
        out["plan_s"] += time.perf_counter() - t1
        engine.end_batch(keys, eviction)
        now = time.perf_counter()
        for it in batch:
            if it.step == live[it.rid].new - 1:
                done[it.rid] = now - start - at[it.rid]
        for k, v in (("batches", batch), ("trace", need), ("loads", len(need - resident)),
                     ("seconds", now - t0), ("start", t0 - start)):  # fmt: skip
            out[k].append(v)
    out["tokens"] = {rid: r.ids[r.prompt :] for rid, r in live.items()}
    out["latency_s"] = np.array([done[rid] / live[rid].new for rid in sorted(live)])
    return out


def _check(m, prompts, news, budget: int, eviction: str) -> None:
    """One line for what queue serving cannot take."""
    if m.ffn.topk != 1:
        raise UserError("queue serving needs one path per token (a top-1 pre-gated model)")
    if eviction not in EVICTIONS:
        raise UserError(f"eviction {eviction!r} is not one of {EVICTIONS}")
    if min(news) < 1 or not all(1 <= len(p) <= budget for p in prompts):
        raise UserError(f"every request needs >= 1 new token and a prompt of 1..{budget} tokens")


def _run_batch(engine, batch, need: set[int], live: dict, route, loads: int) -> None:
    """The batch's requests, run together, on the experts `begin_batch` reads; checks
    that the engine read exactly the planned experts (its own routes, computed with the router's
    KV cache, match the planning pass's)."""
    before = engine.stats()["experts_read"]
    engine.begin_batch(need)
    try:
        rows = [live[it.rid] for it in batch]
        xs = [r.ids[: r.prompt] if it.step == 0 else [r.ids[r.prompt + it.step - 1]]
              for r, it in zip(rows, batch, strict=True)]  # fmt: skip
        outs = engine.forward_batch(
            [(np.asarray([x], np.int32), r.cache) for x, r in zip(xs, rows, strict=True)]
        )
        for r, (logits, r.cache) in zip(rows, outs, strict=True):
            r.ids.append(int(np.asarray(logits[0, -1]).argmax()))
        more = [r for r, it in zip(rows, batch, strict=True) if it.step + 1 < r.new]
        for r, paths in zip(more, route([r.ids for r in more]), strict=True):
            r.paths = paths  # the new token is fed next: its route is needed
    except BaseException:
        engine.end_batch()
        raise
    read = engine.stats()["experts_read"] - before
    if read != loads * len(engine.moe_layers):
        engine.end_batch()
        raise RuntimeError(f"the engine read {read} experts where the plan needs "
                           f"{loads * len(engine.moe_layers)}: its routes differ from the "
                           "planning pass's (a near-tie in the router?)")  # fmt: skip


def _router(engine, length: int):
    """[ids] -> the path of every token of each, from the pre-gating router alone, in one call
    (padded on the right to one length and the rows to a power of two, so that few shapes
    compile; the router is causal, so padding changes nothing)."""
    pos = jnp.arange(length)

    def route(seqs: list[list[int]]) -> list[list[int]]:
        if not seqs:
            return []
        x = np.zeros((bucket(len(seqs)), length), np.int32)
        for row, ids in zip(x, seqs, strict=False):
            row[: len(ids)] = ids
        experts = np.asarray(engine.staged.router(x, pos)[0].experts_TxK[:, 0]).reshape(len(x), -1)
        return [experts[j, : len(ids)].tolist() for j, ids in enumerate(seqs)]

    return route
