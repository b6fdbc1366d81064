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
last uses, or Belady over their next uses in the queue's known future: `policies.victim`). In
between, `forward_batch` runs the batch's requests together: each its own router and attention
against its own KV cache (their rows sit at different positions), and each pre-gated block's
experts once over all the batch's tokens, one grouped matmul over the experts the batch uses, as
a batched server runs a MoE layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mole_jax.infer.offload.moe import MoeOffloadEngine, bucket
from mole_jax.infer.offload.policies import victim


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

    def forward_batch(self, calls):
        """[(ids [1, L_r], cache_r)] -> [(logits [1, L_r, V], advanced cache_r)], the calls run
        as one batch (module docstring); equals `forward` on each call alone. The token-wise
        pieces (embedding, experts, head) run once over all the calls' tokens."""
        if any(np.shape(x)[0] != 1 or c is None for x, c in calls):
            raise ValueError("forward_batch: each call is one row [1, L] with its KV cache")
        self._new_call()
        s, rows = self.staged, []
        ids = [self.check(x) for x, _ in calls]
        h = _split(self._together(s.embed_ids, np.concatenate(ids, axis=1)), ids)
        for x, (_, cache), h_r in zip(ids, calls, h, strict=True):
            index = cache["index"]
            pos = index + jnp.arange(x.shape[1], dtype=jnp.int32)
            routes, rkv = s.router(jnp.asarray(x), pos, cache["router"], index)
            rows.append(dict(n=x.shape[1], index=index, pos=pos, routes=routes, rkv=rkv, h=h_r,
                             cache=cache, kvs=[]))  # fmt: skip
        self.prefetch_all(np.concatenate([np.asarray(r["routes"].experts_TxK) for r in rows]))
        for i, block in enumerate(s.blocks):
            if i in self.moe_layers:
                self._experts_together(i, rows)
                continue
            for r in rows:
                r["h"], _, kv = block(r["h"], None, r["pos"], r["cache"]["layers"][i], r["index"])
                r["kvs"].append(kv)
        logits = self._together(s.logits, np.concatenate([np.asarray(r["h"]) for r in rows], 1))
        return [(y, dict(index=r["index"] + r["n"], layers=r["kvs"], router=r["rkv"]))
                for y, r in zip(_split(logits, ids), rows, strict=True)]  # fmt: skip

    @staticmethod
    def _together(fn, x_1xT):
        """fn over the row's T positions padded to a power of two (token-wise pieces only)."""
        t = x_1xT.shape[1]
        pad = [(0, 0), (0, bucket(t) - t)] + [(0, 0)] * (x_1xT.ndim - 2)
        return np.asarray(fn(np.pad(x_1xT, pad)))[:, :t]

    def compile_batches(self, max_tokens: int) -> None:
        """Compiles `forward_batch`'s token-wise pieces (embedding, experts, head) for every token
        count (padded) up to `max_tokens` and every expert count (padded). The per-request pieces
        (router, attention) compile once per prompt length: a first, untimed run compiles them."""
        s, k = self.staged, self.model_config.ffn.topk
        counts = [1 << j for j in range(bucket(max_tokens).bit_length())]
        sizes = [1 << j for j in range(bucket(self.model_config.ffn.experts).bit_length())]
        h = s.embed_ids(np.zeros((1, 1), np.int32))
        for t in counts:
            self._together(s.embed_ids, np.zeros((1, t), np.int32))
            self._together(s.logits, np.zeros((t, h.shape[-1]), h.dtype)[None])
        for i in sorted(self.moe_layers):
            a, x, _ = self._attend(s.params, s.rest, i, h, jnp.zeros(1, jnp.int32), None, None)
            a, x = np.asarray(a), np.asarray(x)
            one = tuple(self._to_device(t) for t in self.store.start_read(i, 0).result())
            for t in counts:
                pad = ((0, 0), (0, t - 1), (0, 0))
                w, local = np.zeros((t, k), np.float32), np.zeros((t, k), np.int32)
                for n in sizes:
                    up, down = (jnp.stack([one[j]] * n) for j in (0, 1))
                    jax.block_until_ready(self._apply(
                        s.params, s.rest, i, np.pad(a, pad), np.pad(x, pad), w, local, up, down
                    ))  # fmt: skip

    def _experts_together(self, i: int, rows: list[dict]) -> None:
        """Block i over the batch: attention per row, then its experts over every row's tokens
        at once (T padded to a power of two with zero-weight tokens, so shapes repeat). The
        rows are joined and split on the host: their lengths vary with every batch, and a
        device-side join would compile once per combination."""
        s = self.staged
        att = [self._attend(s.params, s.rest, i, r["h"], r["pos"], r["cache"]["layers"][i],
                            r["index"]) for r in rows]  # fmt: skip
        t = sum(r["n"] for r in rows)
        pad = ((0, 0), (0, bucket(t) - t), (0, 0))
        a, x = (
            np.pad(np.concatenate([np.asarray(o[j]) for o in att], axis=1), pad) for j in (0, 1)
        )
        w = np.pad(np.concatenate([np.asarray(r["routes"].weights_TxK) for r in rows]), pad[1:])
        local, up, down = self.load(
            i, np.concatenate([np.asarray(r["routes"].experts_TxK) for r in rows]), None
        )
        y = np.asarray(self._apply(s.params, s.rest, i, a, x, w, np.pad(local, pad[1:]), up, down))
        for r, o, y_r in zip(rows, att, _split(y[:, :t], [o[0] for o in att]), strict=True):
            r["h"] = y_r
            r["kvs"].append(o[2])

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


def _split(x_1xT, like: list) -> list:
    """x's positions cut into consecutive pieces as long as each of `like` ([1, L_r] arrays)."""
    ends = np.cumsum([a.shape[1] for a in like])
    return [x_1xT[:, hi - a.shape[1] : hi] for a, hi in zip(like, ends, strict=True)]


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
