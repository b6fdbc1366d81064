"""Serving a pre-gated MoE's queue: every policy serves each request's prefill and decodes once,
in order, within the token budget; expert-aware batching follows Read-ME's Algorithm 1; the
per-step loads and latencies add up by hand."""

import dataclasses

import numpy as np
import pytest

from mole_jax.infer.offload import serving
from mole_jax.infer.offload.policies import simulate


def random_requests(seed, n=12, experts=6):
    rng = np.random.default_rng(seed)
    out = []
    for rid in range(n):
        p, new = int(rng.integers(1, 9)), int(rng.integers(1, 7))
        # paths with locality: a request mostly stays on its own expert, as Read-ME's router does
        home = int(rng.integers(experts))
        paths = [home if rng.random() < 0.7 else int(rng.integers(experts)) for _ in range(p + new)]
        out.append(serving.Request(rid, tuple(paths), p, new))
    return out


@pytest.mark.parametrize("policy", serving.POLICIES)
@pytest.mark.parametrize("seed", range(6))
def test_every_request_served_once_in_order_within_budget(policy, seed):
    reqs = random_requests(seed)
    batches = serving.schedule(reqs, budget=12, policy=policy)
    assert all(0 < sum(it.tokens for it in b) <= 12 for b in batches)
    seen = {}
    for b in batches:
        assert len({it.rid for it in b}) == len(b)  # one item per request per batch
        for it in b:
            assert it.step == seen.get(it.rid, -1) + 1  # prefill first, then decodes in order
            seen[it.rid] = it.step
    assert seen == {r.rid: r.new - 1 for r in reqs}
    tokens = sum(it.tokens for b in batches for it in b)
    assert tokens == sum(r.prompt + r.new - 1 for r in reqs)


def test_expert_aware_is_algorithm_1():
    items = [serving.Item(0, 1, (2,)), serving.Item(1, 1, (5,)), serving.Item(2, 0, (5, 5, 1)),
             serving.Item(3, 1, (2,)), serving.Item(4, 1, (5,))]  # fmt: skip
    # queues: expert 5 holds 1 + 3 + 1 = 5 tokens, expert 2 holds 2: take 5's whole queue, then
    # expert 2's does not fit a budget of 6: fill one of its items and stop
    assert [it.rid for it in serving.expert_aware(items, 6)] == [1, 2, 4, 0]
    assert [it.rid for it in serving.expert_aware(items, 7)] == [1, 2, 4, 0, 3]
    assert [it.rid for it in serving.expert_aware(items, 4)] == [1, 2]


def test_expert_aware_batches_need_fewer_experts_on_local_paths():
    reqs = random_requests(0, n=40)
    unique = {p: np.mean([len(s) for s in serving.trace_of(serving.schedule(reqs, 16, p))])
              for p in serving.POLICIES}  # fmt: skip
    assert unique["expert_aware"] < min(unique["decode_first"], unique["prefill_first"])


def test_step_loads_and_latencies_by_hand():
    trace = [{1, 2}, {2, 3}, {1}, {2, 3}]
    r = simulate(trace, 2, "belady")
    # t1 loads 3 and drops 2 (next use at t3, as 3's; the lower id goes first); t2 hits 1
    assert r["step_loads"] == [2, 1, 0, 1] and sum(r["step_loads"]) == r["loads"]
    reqs = [serving.Request(0, (1, 1, 2), 2, 2), serving.Request(1, (3, 3), 1, 1)]
    batches = serving.schedule(reqs, budget=3, policy="prefill_first")
    # step 1: prefill 0 (2 tokens) + prefill 1 (1); step 2: decode 0
    assert [[(it.rid, it.step) for it in b] for b in batches] == [[(0, 0), (1, 0)], [(0, 1)]]
    lat = serving.latencies(reqs, batches, [1.0, 0.5])
    np.testing.assert_allclose(lat, [1.5 / 2, 1.0 / 1])
    with pytest.raises(ValueError, match="longer than the token budget"):
        serving.schedule(reqs, budget=1, policy="decode_first")


@pytest.mark.parametrize("policy", serving.POLICIES)
def test_known_future_is_the_schedule_when_nothing_new_arrives(policy):
    reqs = [dataclasses.replace(r, new=1) for r in random_requests(7)]
    full = serving.trace_of(serving.schedule(reqs, budget=12, policy=policy))
    prefills = [serving.item(r, 0) for r in reqs]
    assert serving.known_future(prefills, [], 12, policy) == full


@pytest.mark.parametrize("policy", serving.POLICIES)
@pytest.mark.parametrize("seed", range(3))
def test_replay_at_time_zero_is_the_schedule_and_the_lru_replay(policy, seed):
    """Everything queued at 0: the batches are `schedule`'s whatever the batch costs, LRU loads
    equal the offline replay's, and the clock is the sum of the batch costs."""
    reqs = random_requests(seed)
    cost = lambda tokens, unique, loads: 1.0 + 0.1 * tokens + 0.5 * unique + 2.0 * loads  # noqa: E731
    out = serving.replay(reqs, 12, policy, cost, capacity=3, eviction="lru")
    batches = serving.schedule(reqs, 12, policy)
    assert out["batches"] == batches
    assert out["loads"] == simulate(serving.trace_of(batches), 3, "lru")["step_loads"]
    steps = zip(batches, out["trace"], out["loads"], strict=True)
    ends = np.cumsum([cost(sum(i.tokens for i in b), len(t), k) for b, t, k in steps])
    np.testing.assert_allclose(out["end"], ends)
    want = serving.latencies(reqs, batches, np.diff(ends, prepend=0))
    np.testing.assert_allclose(out["latency_s"], want)
    belady = serving.replay(reqs, 12, policy, cost, capacity=3)  # eviction changes no batch
    assert belady["batches"] == batches and belady["trace"] == out["trace"]


@pytest.mark.parametrize("policy", serving.POLICIES)
def test_replay_waits_for_arrivals(policy):
    """A request is never served before it arrives; an idle queue jumps to the next arrival; its
    latency counts from its arrival; every request is served once, in order."""
    reqs = [dataclasses.replace(r, arrival=3.0 * r.rid) for r in random_requests(7, n=6)]
    out = serving.replay(reqs, 12, policy, lambda t, u, k: 0.5, capacity=2, eviction="lru")
    first = {}
    for b, start in zip(out["batches"], out["start"], strict=True):
        for it in b:
            assert start >= reqs[it.rid].arrival
            first.setdefault(it.rid, start)
    assert first == {r.rid: r.arrival for r in reqs}  # every request starts the moment it comes
    ends = dict(zip([it.rid for b in out["batches"] for it in b if it.step == reqs[it.rid].new - 1],
                    [e for b, e in zip(out["batches"], out["end"], strict=True) for it in b
                     if it.step == reqs[it.rid].new - 1], strict=True))  # fmt: skip
    want = [(ends[r.rid] - r.arrival) / r.new for r in reqs]
    np.testing.assert_allclose(out["latency_s"], want)
    assert sorted((it.rid, it.step) for b in out["batches"] for it in b) == sorted(
        (r.rid, s) for r in reqs for s in range(r.new)
    )
    with pytest.raises(ValueError, match="eviction"):
        serving.replay(reqs, 12, policy, lambda t, u, k: 0.5, capacity=2, eviction="fifo")
