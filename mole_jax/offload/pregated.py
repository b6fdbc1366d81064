"""Lookahead offloading for pre-gated models (Read-ME's serving side): engine mode 'lookahead'.

The pre-gating router runs first (its own jitted piece, with its KV cache), so before the first
block runs the engine knows every expert every layer of this forward call will use: it starts
reading all of them at once (exact prefetch: layer l+1's experts arrive while layer l computes;
`expert_recall` is 1 by construction, against the MoE baseline's speculative guess), and each
block waits only for its own. The resident model is the pre-gated 'offload' form (no routed
experts); the experts come from `export --experts` (`W/experts`, any of its widths) through the
MoE engine's per-layer LRU cache of `capacity` experts, whose counters and `record`ed traces it
shares (`offload/policies.py` replays them, Belady included).

Batch mode (`offload/server.py`, serving a request queue): `begin_batch(experts)` starts reading
the whole batch's experts in every layer and holds everything read until `end_batch(keys,
policy)`, which brings each layer's cache back to `capacity` by the policy (LRU over the keys'
last uses, or Belady over their next uses in the queue's known future: `policies.victim`). The
batch's requests run one forward call each in between, sharing the loaded experts.
"""

from __future__ import annotations

import jax
import numpy as np

from mole_jax.offload.moe import MoeOffloadEngine
from mole_jax.offload.policies import victim


class LookaheadEngine(MoeOffloadEngine):
    """Engine mode 'lookahead'. options: store (directory, default 'experts'), capacity (experts
    cached per layer), record (keep each layer's needed-expert sets in `trace`)."""

    KIND = "pregated"

    def __init__(self, wd, mode, step=None, store="experts", capacity=4, record=False):
        super().__init__(wd, mode, step, store, capacity, record=record)
        s = self.staged
        merge = s.merge
        route = jax.jit(lambda p, r, ids, pos, kv, index: merge(p, r).router(ids, pos, kv, index))
        s.router = lambda ids, pos, kv=None, index=None: route(
            s.params, s.rest, ids, pos, kv, index
        )
        self._attend = jax.jit(lambda p, r, i, h, pos, kv, index: merge(p, r).blocks[i].attend(
            h, pos, kv, index), static_argnums=(2,))  # fmt: skip
        self._apply = jax.jit(lambda p, r, i, a, x, w, local, up, down: a + merge(p, r).blocks[
            i].ffn.apply_experts(x, w, local, up, down), static_argnums=(2,))  # fmt: skip
        self.info.update(prefetch=True, prefetch_mode="exact (routes known before the blocks)")

    def _block(self, i: int):
        return _LookaheadBlock(self, i)

    def reset_stats(self) -> None:
        super().reset_stats()
        self._batch = False

    def _new_call(self) -> None:
        if not self._batch:  # in a batch the batch's reads stay in flight across calls
            super()._new_call()

    def begin_batch(self, experts) -> None:
        """Starts reading `experts` (every expert the batch's tokens use) in every layer; until
        `end_batch` nothing is evicted."""
        self._new_call()
        self._batch = True
        self.prefetch_all(np.asarray(sorted(experts)))

    def end_batch(self, keys: dict[int, float] | None = None, policy: str = "lru") -> None:
        """Leaves batch mode, evicting down to `capacity` per layer: `keys[e]` is expert e's last
        use (lru) or next use (belady), for every resident expert; without keys (after a
        failure) the least recently inserted go first."""
        self._batch = False
        self._new_call()
        for cache in self.cache.values():
            while len(cache) > self.capacity:
                if keys is None:
                    cache.popitem(last=False)
                else:
                    del cache[victim({e: keys[e] for e in cache}, policy)]

    def _insert(self, layer: int, expert: int, weights) -> None:
        if not self._batch:
            return super()._insert(layer, expert, weights)
        self.cache[layer][expert] = weights
        self.cache[layer].move_to_end(expert)

    def forward(self, ids_BxL, cache=None, prepared=None):
        self._started = False
        return super().forward(ids_BxL, cache, prepared)

    def prefetch_all(self, experts_TxK) -> None:
        """Starts reading, for every pre-gated layer, each expert the routes name that the
        layer's cache lacks: the whole call's loads are in flight before the first block."""
        need = sorted({int(e) for e in np.asarray(experts_TxK).ravel()})
        for j in sorted(self.moe_layers):
            pending = self._pending.setdefault(j, {})
            for e in need:
                if e not in self.cache[j] and e not in pending:
                    pending[e] = self.store.start_read(j, e)
            self._guessed[j] = set(need)  # the "guess" is the truth: recall 1


class _LookaheadBlock:
    """Pre-gated block i: attention, then the experts its (already read) routes need."""

    def __init__(self, engine: LookaheadEngine, i: int):
        self.engine, self.i = engine, i

    def __call__(self, h, ctx, pos_L, kv=None, index=None):
        eng, i, s = self.engine, self.i, self.engine.staged
        routes = ctx.routes
        if not eng._started:
            eng.prefetch_all(routes.experts_TxK)
            eng._started = True
        a, x, kv = eng._attend(s.params, s.rest, i, h, pos_L, kv, index)
        local, up, down = eng.load(i, np.asarray(routes.experts_TxK), None)
        return eng._apply(s.params, s.rest, i, a, x, routes.weights_TxK, local, up, down), {}, kv
