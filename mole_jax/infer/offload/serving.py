"""Batch scheduling for a pre-gated MoE's request queue, and its replay through a shared expert
cache (Read-ME's Section 4: expert-aware batching, Algorithm 1, and the Belady cache).

A request is a prompt of P tokens and N tokens to generate; its path (`paths`, one expert id per
token, from the pre-gating router) is known for every token it has. Its work arrives as items:
one prefill (its P prompt tokens, which also yields the first new token) and then N - 1 decodes
(one token each, the previously generated one). Each scheduling step forms one batch of at most
`budget` tokens from the ready items (the prefills of waiting requests, the next decode of each
running request) by a policy:
- `decode_first`: running requests' decodes in queue order, then prefills (decode-prioritised;
  a prefill that does not fit is passed over for a later, smaller one);
- `prefill_first`: waiting prefills first, then decodes;
- `expert_aware`: Read-ME's Algorithm 1: ready items grouped by expert (a decode by its token's
  path, a prefill by its prompt's most frequent path); repeatedly take the expert with the most
  queued tokens and add its whole queue if it fits, else fill the budget from it and stop. No
  aging: a request on a rarely used path waits until the busier queues drain (the p95 shows it).
`schedule` puts every request in the queue at the start, so the sequence of batches does not depend
on how long each takes. `replay` serves a stream instead: request i is ready from its arrival time,
each batch lasts what a cost model says (it may depend on the batch's tokens, unique experts and
expert loads), and the shared cache is evicted online, by LRU or by Belady over the known future
of the ready items (`known_future`), as the executed server does; both, and the server, keep the
queue in a `Stream`. Because pre-gated experts are aligned, a batch needs the same expert ids in
every layer: its trace entry is the union of its tokens' paths, and each layer's cache sees the
same trace (`policies.simulate` replays it: Random, LRU, or Belady over the real future of the
trace, known ahead because the queue's routes are).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import numpy as np

from mole_jax.infer.offload.policies import victim

POLICIES = ("decode_first", "prefill_first", "expert_aware")


@dataclasses.dataclass(frozen=True)
class Request:
    rid: int
    paths: tuple[int, ...]  # the route of every token: prompt, then the generated ones
    prompt: int  # P
    new: int  # N >= 1
    arrival: float = 0.0  # seconds; `replay` only (`schedule` queues everything at time 0)


@dataclasses.dataclass(frozen=True)
class Item:
    rid: int
    step: int  # 0: the prefill; j >= 1: the j-th decode
    experts: tuple[int, ...]  # the paths of the tokens it processes

    @property
    def tokens(self) -> int:
        return len(self.experts)

    @property
    def key(self) -> int:
        """The expert an item is queued under (its most frequent path; the lowest id on ties)."""
        counts = Counter(self.experts)
        return min(counts, key=lambda e: (-counts[e], e))


def item(r: Request, step: int) -> Item:
    if step == 0:
        return Item(r.rid, 0, r.paths[: r.prompt])
    return Item(r.rid, step, (r.paths[r.prompt + step - 1],))


def schedule(requests: list[Request], budget: int, policy: str) -> list[list[Item]]:
    """The batches, in order, that serve every request's prefill and decodes once (every request
    queued at time 0, whatever its `arrival`)."""
    _check(requests, budget, policy)
    queue, batches = Stream([dataclasses.replace(r, arrival=0.0) for r in requests]), []
    while not queue.done:
        queue.admit(0.0)
        batch = _pick(*queue.ready(), budget, policy)
        queue.advance(batch)
        batches.append(batch)
    return batches


class Stream:
    """A request stream's queue: a request waits until its arrival, then its prefill is ready;
    after it, one decode at a time until its `new` tokens are out. `item_of(rid, step)` gives
    the ready work with its experts (default: from the requests' own paths)."""

    def __init__(self, requests: list[Request], item_of=None):
        self.by_id = {r.rid: r for r in requests}
        self.pending = sorted(requests, key=lambda r: (r.arrival, r.rid))
        self.waiting: list[Request] = []
        self.running: dict[int, int] = {}  # rid -> the next decode step
        self.item_of = item_of or (lambda rid, step: item(self.by_id[rid], step))

    @property
    def done(self) -> bool:
        return not (self.pending or self.waiting or self.running)

    def admit(self, now: float) -> None:
        """The requests that have arrived by `now` join the queue."""
        while self.pending and self.pending[0].arrival <= now:
            self.waiting.append(self.pending.pop(0))

    def ready(self) -> tuple[list[Item], list[Item]]:
        """(prefills, decodes) ready now."""
        prefills = [self.item_of(r.rid, 0) for r in self.waiting]
        return prefills, [self.item_of(rid, s) for rid, s in self.running.items()]

    def next_arrival(self) -> float:
        return self.pending[0].arrival

    def advance(self, batch: list[Item]) -> None:
        """Moves the queue past `batch`: its prefills leave the waiting list, each request's
        next decode step becomes ready until its `new` tokens are out."""
        assert batch, "an item always fits: prompts <= budget, decodes are 1 token"
        for it in batch:
            r = self.by_id[it.rid]
            if it.step == 0:
                self.waiting.remove(r)
            if it.step + 1 < r.new:
                self.running[r.rid] = it.step + 1
            else:
                self.running.pop(r.rid, None)


def _check(requests: list[Request], budget: int, policy: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r} is not one of {POLICIES}")
    if any(r.prompt > budget for r in requests):
        raise ValueError(f"a prompt is longer than the token budget {budget}")
    bad = [
        r.rid for r in requests if min(r.prompt, r.new) < 1 or len(r.paths) < r.prompt + r.new - 1
    ]
    if bad:
        raise ValueError(f"requests {bad}: prompt and new must be >= 1, with a path per token")


def known_future(prefills: list[Item], decodes: list[Item], budget: int, policy: str):
    """The batches the queue would form next from the items known now (the decodes after these
    are not: their tokens are not generated yet), as sets of experts: Belady's future."""
    prefills, decodes, batches = list(prefills), list(decodes), []
    while prefills or decodes:
        batch = _pick(prefills, decodes, budget, policy)
        prefills = [i for i in prefills if i not in batch]
        decodes = [i for i in decodes if i not in batch]
        batches.append(batch)
    return trace_of(batches)


def pick(prefills: list[Item], decodes: list[Item], budget: int, policy: str) -> list[Item]:
    """One batch of at most `budget` tokens from the ready items, by `policy`."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r} is not one of {POLICIES}")
    return _pick(prefills, decodes, budget, policy)


def _pick(prefills: list[Item], decodes: list[Item], budget: int, policy: str) -> list[Item]:
    if policy == "expert_aware":
        return expert_aware(prefills + decodes, budget)
    order = decodes + prefills if policy == "decode_first" else prefills + decodes
    batch, used = [], 0
    for it in order:
        if used + it.tokens <= budget:
            batch.append(it)
            used += it.tokens
    return batch


def expert_aware(ready: list[Item], budget: int) -> list[Item]:
    """Read-ME Algorithm 1 over the ready items (kept in queue order within an expert)."""
    queues: dict[int, list[Item]] = {}
    for it in ready:
        queues.setdefault(it.key, []).append(it)
    batch, used = [], 0
    while queues:
        e = max(queues, key=lambda k: (sum(i.tokens for i in queues[k]), -k))
        queue = queues.pop(e)
        if used + sum(i.tokens for i in queue) <= budget:
            batch += queue
            used += sum(i.tokens for i in queue)
            continue
        for it in queue:
            if used + it.tokens <= budget:
                batch.append(it)
                used += it.tokens
        break
    return batch


def replay(
    requests: list[Request],
    budget: int,
    policy: str,
    seconds,
    capacity: int,
    eviction: str = "belady",
) -> dict:
    """The queue served in time. Request r is ready from `r.arrival`; each batch starts when the
    one before it ends (or at the next arrival when nothing is ready) and lasts
    `seconds(tokens, unique_experts, loads)`. One shared cache of `capacity` experts (the same ids
    in every layer) takes each batch's missing experts (`loads`) and is then brought back to
    `capacity` by `eviction`: "lru", or "belady" over the known future (`known_future` of the
    items ready then: online, as the executed server). Returns the batches, their trace, loads,
    start and end times and seconds, and each request's latency per token, (done - arrival) /
    new: the keys `server.serve` returns."""
    _check(requests, budget, policy)
    if eviction not in ("lru", "belady"):
        raise ValueError(f"eviction {eviction!r} is not lru or belady")
    queue, resident, done = Stream(requests), {}, {}
    out = dict(batches=[], trace=[], loads=[], start=[], end=[], seconds=[])
    clock = 0.0
    while not queue.done:
        queue.admit(clock)
        prefills, decodes = queue.ready()
        if not (prefills or decodes):
            clock = queue.next_arrival()
            continue
        batch = _pick(prefills, decodes, budget, policy)
        need = trace_of([batch])[0]
        loads = len(need - resident.keys())
        out["start"].append(clock)
        clock += seconds(sum(it.tokens for it in batch), len(need), loads)
        queue.advance(batch)
        queue.admit(clock)
        resident.update(dict.fromkeys(need, len(out["batches"])))  # lru's key: the last use
        if eviction == "belady":
            resident = next_uses_of(known_future(*queue.ready(), budget, policy), resident)
        while len(resident) > capacity:
            del resident[victim(resident, eviction)]
        for it in batch:
            if it.step == queue.by_id[it.rid].new - 1:
                done[it.rid] = clock
        for k, v in (("batches", batch), ("trace", need), ("loads", loads), ("end", clock),
                     ("seconds", clock - out["start"][-1])):  # fmt: skip
            out[k].append(v)
    out["latency_s"] = np.array([(done[r.rid] - r.arrival) / r.new for r in requests])
    return out


def next_uses_of(future: list[set[int]], experts) -> dict[int, float]:
    """Each of `experts` -> the first batch of `future` that needs it (1-based; inf if none)."""
    out = dict.fromkeys(experts, math.inf)
    for t, need in enumerate(future, start=1):
        for e in need:
            if e in out:
                out[e] = min(out[e], t)
    return out


def trace_of(batches: list[list[Item]]) -> list[set[int]]:
    """Each batch's needed experts (per layer: the same ids in every layer)."""
    return [{e for it in b for e in it.experts} for b in batches]


def latencies(requests, batches, step_seconds) -> np.ndarray:
    """Per request: the time its last token is produced / its generated tokens (Read-ME's metric:
    end-to-end latency per generated token), all requests queued at time 0. step_seconds[i]: the
    time batch i takes."""
    done, clock = {}, 0.0
    by_id = {r.rid: r for r in requests}
    for batch, dt in zip(batches, step_seconds, strict=True):
        clock += dt
        for it in batch:
            if it.step == by_id[it.rid].new - 1:
                done[it.rid] = clock
    return np.array([done[r.rid] / r.new for r in requests])
