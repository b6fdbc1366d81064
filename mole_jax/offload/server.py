"""Serving a queue of requests on the lookahead engine (Read-ME's serving loop, executed).

Every request is queued at time 0 with its prompt and the number of tokens to generate (greedy).
The pre-gating router gives each prompt token's path at once, and each generated token's path as
soon as the token exists (the router is causal and runs on token ids only), so the queue's ready
items are always known with their experts. Each step:

1. a batch of at most `budget` tokens is picked from the ready items by the batching policy
   (`serving.pick`: decode-first, prefill-first or expert-aware, Read-ME Algorithm 1);
2. the engine starts reading every expert the batch needs that its shared cache lacks, in every
   layer at once (`LookaheadEngine.begin_batch`: exact prefetch), and each request of the batch
   runs its own forward call against its own KV cache, all sharing the loaded experts (rows of
   different requests sit at different positions, so they are not fused into one call);
3. the cache is brought back to `capacity` experts per layer by LRU, or by Belady over the
   queue's known future: the batches the ready items would form next (`serving.known_future`;
   decodes whose tokens do not exist yet are not in it).

Wall-clock time is measured (the router passes and Belady's planning included; `plan_s` says how
much of it was planning): a request's latency per token is the time its last token is produced /
its generated tokens (Read-ME's metric).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax.numpy as jnp
import numpy as np

from mole_jax.errors import UserError
from mole_jax.offload import serving

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


def serve(engine, prompts, news, budget: int, policy: str, eviction: str = "belady") -> dict:
    """Serves every request (prompt i, news[i] tokens) through `engine` (a LookaheadEngine of a
    top-1 pre-gated model). Returns the generated tokens per request, the batches (items), the
    trace (experts per batch), per-batch loads and seconds, and per-request latency per token."""
    m = engine.model_config
    if m.ffn.topk != 1:
        raise UserError("queue serving needs one path per token (a top-1 pre-gated model)")
    if eviction not in EVICTIONS:
        raise UserError(f"eviction {eviction!r} is not one of {EVICTIONS}")
    if min(news) < 1 or not all(1 <= len(p) <= budget for p in prompts):
        raise UserError(f"every request needs >= 1 new token and a prompt of 1..{budget} tokens")
    route = _router(engine, max(len(p) + n for p, n in zip(prompts, news, strict=True)))
    start = time.perf_counter()
    live = {}
    for rid, (p, n) in enumerate(zip(prompts, news, strict=True)):
        ids = [int(t) for t in p]
        live[rid] = _Live(ids, len(ids), int(n), route(ids), engine.init_cache(1, len(ids) + n))
    by_id = {rid: serving.Request(rid, (), r.prompt, r.new) for rid, r in live.items()}
    waiting, running = list(by_id.values()), {}
    out = dict(batches=[], trace=[], loads=[], seconds=[], plan_s=0.0)
    last_use, done = {}, {}

    def ready():
        return ([live[r.rid].item(r.rid, 0) for r in waiting],
                [live[rid].item(rid, s) for rid, s in running.items()])  # fmt: skip

    while waiting or running:
        batch = serving.pick(*ready(), budget, policy)
        need = serving.trace_of([batch])[0]
        resident = set(next(iter(engine.cache.values()), {}))
        t0 = time.perf_counter()
        _run_batch(engine, batch, need, live, route, len(need - resident))
        serving.advance(batch, waiting, running, by_id)
        last_use.update(dict.fromkeys(need, len(out["batches"])))
        t1 = time.perf_counter()
        keys = last_use if eviction == "lru" else _next_uses(serving.known_future(
            *ready(), budget, policy), m.ffn.experts)  # fmt: skip
        out["plan_s"] += time.perf_counter() - t1
        engine.end_batch(keys, eviction)
        now = time.perf_counter()
        for it in batch:
            if it.step == live[it.rid].new - 1:
                done[it.rid] = now - start
        for k, v in (("batches", batch), ("trace", need), ("loads", len(need - resident)),
                     ("seconds", now - t0)):  # fmt: skip
            out[k].append(v)
    out["tokens"] = {rid: r.ids[r.prompt :] for rid, r in live.items()}
    out["latency_s"] = np.array([done[rid] / live[rid].new for rid in sorted(live)])
    return out


def _run_batch(engine, batch, need: set[int], live: dict, route, loads: int) -> None:
    """The batch's requests, one forward call each, on the experts `begin_batch` reads; checks
    that the engine read exactly the planned experts (its own routes, computed with the router's
    KV cache, match the planning pass's)."""
    before = engine.stats()["experts_read"]
    engine.begin_batch(need)
    try:
        for it in batch:
            _run(engine, live[it.rid], it, route)
    except BaseException:
        engine.end_batch()
        raise
    read = engine.stats()["experts_read"] - before
    if read != loads * len(engine.moe_layers):
        engine.end_batch()
        raise RuntimeError(f"the engine read {read} experts where the plan needs "
                           f"{loads * len(engine.moe_layers)}: its routes differ from the "
                           "planning pass's (a near-tie in the router?)")  # fmt: skip


def _run(engine, r: _Live, it: serving.Item, route) -> None:
    """One item of a request: its forward call, the greedy next token, and that token's path."""
    x = r.ids[: r.prompt] if it.step == 0 else [r.ids[r.prompt + it.step - 1]]
    logits, r.cache = engine.forward(np.asarray([x], np.int32), r.cache)
    r.ids.append(int(np.asarray(logits[0, -1]).argmax()))
    if it.step + 1 < r.new:  # the new token is fed next: its route is needed
        r.paths = route(r.ids)


def _router(engine, length: int):
    """ids -> the path of every token, from the pre-gating router alone (padded on the right to
    one length, so that it compiles once; the router is causal, so padding changes nothing)."""
    pos = jnp.arange(length)

    def route(ids: list[int]) -> list[int]:
        x = np.zeros((1, length), np.int32)
        x[0, : len(ids)] = ids
        routes = engine.staged.router(x, pos)[0]
        return np.asarray(routes.experts_TxK[: len(ids), 0]).tolist()

    return route


def _next_uses(future: list[set[int]], n_experts: int) -> dict[int, float]:
    """Expert -> the first future batch that needs it (1-based; inf if none is known)."""
    out = dict.fromkeys(range(n_experts), math.inf)
    for t, need in enumerate(future, start=1):
        for e in need:
            out[e] = min(out[e], t)
    return out
