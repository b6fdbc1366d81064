"""Expert-cache policies: Belady equals a brute-force optimum, never loses to LRU or Random, and
LRU matches a hand-computed replay."""

import itertools
import math

import numpy as np
import pytest

from mole_jax.infer.offload.policies import next_uses, simulate


def optimal_loads(trace, capacity) -> int:
    """Fewest loads over every sequence of eviction choices (exhaustive; tiny traces only)."""
    best = math.inf

    def go(t, cache, loads):
        nonlocal best
        if loads >= best:
            return
        if t == len(trace):
            best = loads
            return
        held = cache | trace[t]
        for keep in itertools.combinations(sorted(held), min(capacity, len(held))):
            go(t + 1, frozenset(keep), loads + len(trace[t] - cache))

    go(0, frozenset(), 0)
    return best


def random_trace(rng, steps, experts, width):
    return [set(rng.choice(experts, rng.integers(1, width + 1), replace=False).tolist())
            for _ in range(steps)]  # fmt: skip


@pytest.mark.parametrize("seed", range(12))
def test_belady_is_optimal_and_never_worse(seed):
    rng = np.random.default_rng(seed)
    trace = random_trace(rng, steps=9, experts=6, width=3)
    for capacity in (1, 2, 3):
        belady = simulate(trace, capacity, "belady")["loads"]
        assert belady == optimal_loads([frozenset(s) for s in trace], capacity)
        assert belady <= simulate(trace, capacity, "lru")["loads"]
        assert belady <= simulate(trace, capacity, "random", seed=seed)["loads"]


def test_lru_and_belady_hand_replays():
    trace = [{1, 2}, {3}, {1}, {2}, {3, 1}]
    # cap 2, lru: [1,2] -> 3 drops 1 -> 1 drops 2 -> 2 drops 3 -> {3,1}: 1 hit, then 2 is dropped
    r = simulate(trace, 2, "lru")
    assert (r["lookups"], r["hits"], r["loads"]) == (7, 1, 6)
    # belady keeps 1 and 2 and drops 3 after its use (next use t=4, the farthest): hits at t=2,
    # t=3 and for 1 at t=4
    assert simulate(trace, 2, "belady")["hits"] == 3
    assert simulate(trace, 3, "lru")["loads"] == 3  # everything fits: only cold loads
    # a step wider than the cache: all three load, two stay (lru: the higher ids, as the engine)
    assert simulate([{1, 2, 3}, {2, 3}], 2, "lru")["hits"] == 2
    assert simulate([{1, 2}, {1, 2}], 0, "lru")["hits"] == 0


def test_next_uses_and_bad_arguments():
    assert next_uses([{1}, {2}, {1, 2}]) == [{1: 2}, {2: 2}, {1: math.inf, 2: math.inf}]
    with pytest.raises(ValueError, match="capacity"):
        simulate([{1}], -1, "lru")
    with pytest.raises(ValueError, match="policy"):
        simulate([{1}], 2, "fifo")
