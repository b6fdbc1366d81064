"""Expert-cache replacement policies replayed over a recorded trace of expert requests.

A trace is one layer's sequence of steps; a step is the set of experts needed together (the
layer's top-k experts for the tokens of one forward call). Needed experts that are not resident are
loaded for the step; after it, the cache keeps `capacity` experts of the resident and just-used
ones and drops the rest by the policy — what `MoeOffloadEngine` does, so a step may need more
experts than the cache holds. Policies:
- `lru`: drop the least recently used (the MoE offloading baseline, Eliseev & Mazur 2023; the
  engine's own rule, ties dropping the lower expert id first as the engine does);
- `random`: drop uniformly at random (a floor);
- `belady`: drop the one whose next use is farthest in the future (never used again first).
  Optimal, and realisable only when the routes are known ahead, as with Read-ME's pre-gating
  router.
"""

from __future__ import annotations

import math

import numpy as np

POLICIES = ("random", "lru", "belady")


def next_uses(trace: list[set[int]]) -> list[dict[int, float]]:
    """For each step t and each expert e it needs, the next step after t that needs e (inf if
    none)."""
    out: list[dict[int, float]] = [{} for _ in trace]
    upcoming: dict[int, float] = {}
    for t in range(len(trace) - 1, -1, -1):
        for e in trace[t]:
            out[t][e] = upcoming.get(e, math.inf)
            upcoming[e] = t
    return out


def simulate(trace: list[set[int]], capacity: int, policy: str, seed: int = 0) -> dict:
    """Replays `trace` through a cache of `capacity` experts; returns hits, lookups, loads and
    `step_loads` (the experts loaded at each step)."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r} is not one of {POLICIES}")
    if capacity < 0:
        raise ValueError(f"capacity {capacity} must be >= 0")
    future = next_uses(trace) if policy == "belady" else None
    rng = np.random.default_rng(seed)
    key: dict[int, float] = {}  # resident expert -> last use (lru) or next use (belady)
    hits = lookups = 0
    step_loads = []
    for t, step in enumerate(trace):
        need = set(step)
        lookups += len(need)
        hits += len(need & key.keys())
        step_loads.append(len(need - key.keys()))
        for e in need:
            key[e] = future[t][e] if future is not None else t
        while len(key) > capacity:
            del key[victim(key, policy, rng)]
    loads = lookups - hits
    return dict(hits=hits, lookups=lookups, loads=loads, hit_rate=hits / max(1, lookups),
                step_loads=step_loads)  # fmt: skip


def victim(key: dict[int, float], policy: str, rng=None) -> int:
    """The resident expert to drop: `key` maps each resident expert to its last use (lru) or
    next use (belady); ties drop the lowest id."""
    resident = sorted(key)
    if policy == "random":
        return int(resident[rng.integers(len(resident))])
    if policy == "lru":
        return min(resident, key=lambda e: key[e])
    return max(resident, key=lambda e: key[e])  # belady: farthest next use
