"""The MoE expert-offloading baseline: only the non-expert weights stay resident; each layer's
routed experts are loaded from an `ExpertStore` when the router picks them, through a per-layer
LRU cache of `capacity` experts, optionally with speculative prefetch.

The forward pass is the model's own (`model.forward` over `offload/staged.py` pieces); a MoE block
puts the host between its router and its experts, because which experts a layer needs is known
only once its router has seen that layer's input:

    Block.attend + MoE route (jit) -> host: load the chosen experts (cache, else storage)
    -> MoE apply_experts on the chosen set only (jit, the same permute / grouped matmul as training)

Speculative prefetch (Eliseev & Mazur, 2023): layer i's post-attention state is also put through
the norm and router of layer i + `lookahead`; each token's `prefetch_k` best guessed experts are
read in the background while layers i .. i + lookahead - 1 compute. `stats()` counts expert
lookups, cache hits, experts read, bytes moved, how many needed experts the guess had named
(`prefetch_recall`) and how many were resident or already on their way when needed — cached or
prefetched (`expert_recall`, the paper's Fig. 2 quantity).
"""

from __future__ import annotations

import collections
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from mole_jax.errors import UserError
from mole_jax.infer.engine import BaseEngine, require_causal
from mole_jax.infer.offload.staged import StagedBlock, StagedModel
from mole_jax.model.backbone import forward
from mole_jax.stores import quant
from mole_jax.stores.experts import ExpertStore
from mole_jax.train.checkpoint import restore_model


@dataclasses.dataclass
class ExpertStats:
    lookups: int = 0  # (layer, expert) pairs a forward call needed, summed over calls
    hits: int = 0  # of those, already resident in the layer's cache
    predicted: int = 0  # of those, named by the speculative guess
    ready: int = 0  # of those, cached or prefetched (read started) when the layer needed them
    experts_read: int = 0  # experts read from storage (prefetched ones included)
    bytes_read: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def prefetch_recall(self) -> float:
        return self.predicted / self.lookups if self.lookups else 0.0

    @property
    def expert_recall(self) -> float:
        return self.ready / self.lookups if self.lookups else 0.0


class MoeOffloadEngine(BaseEngine):
    """Engine mode 'moe_offload'. options: store (directory, default 'experts'), capacity
    (experts cached per layer), prefetch (speculative), prefetch_k (guessed experts read per
    token, default the router's top-k), lookahead (layers ahead the guess is for, default 1),
    load_all (the naive baseline: every expert of a layer is read at each forward call, nothing
    cached), record (keep each layer's sequence of needed-expert sets in `trace`, for
    offload/policies.py)."""

    KIND = "moe"  # the FFN kind whose experts this engine loads (a subclass: pregated)

    def __init__(self, wd, mode, step=None, store="experts", capacity=4, prefetch=False,
                 record=False, prefetch_k=None, lookahead=1, load_all=False):  # fmt: skip
        super().__init__(wd, mode)
        m = self.model_config
        if m.kind != self.KIND:
            raise UserError(f"{wd} holds a '{m.kind}' model, not a '{self.KIND}' one")
        require_causal(m, "expert offloading (which loads a token's experts as it arrives)")
        if capacity < 0:
            raise UserError(f"expert cache capacity {capacity} must be >= 0")
        topk = m.ffn.topk
        prefetch_k = topk if prefetch_k is None else prefetch_k
        if not 1 <= prefetch_k <= topk or lookahead < 1:
            raise UserError(f"prefetch_k={prefetch_k} must be in [1, {topk}], lookahead >= 1")
        model = restore_model(wd, m, "offload", step)
        self.store = ExpertStore.open(
            wd.store(store), expect={"params_digest": model.params_digest}
        )
        self.step, self.capacity, self.prefetch = model.step, capacity, prefetch
        self.prefetch_k, self.lookahead, self.load_all = prefetch_k, lookahead, load_all
        self.exact_slots = False  # True: no padding to a power of two (one compile per count)
        if load_all and (capacity or prefetch):
            raise UserError("load_all reads whole layers: use it with capacity=0 and no prefetch")
        self._to_device = _device_weights(self.store.dtype)
        self.moe_layers = {i for i in range(m.n_layers) if m.kind_of_layer(i) == m.kind}
        self.staged = StagedModel(model.graphdef, model.params, model.rest, m.vocab_size)
        self._attend_route = jax.jit(_attend_route(self.staged.merge), static_argnums=(2, 7, 8))
        self._experts_fn = partial(jax.jit, static_argnums=(2,))(_experts(self.staged.merge))
        self.staged.blocks = [
            self._block(i) if i in self.moe_layers else StagedBlock(self.staged, i)
            for i in range(m.n_layers)
        ]
        self.info = dict(
            expert_dtype=self.store.dtype,
            bytes_per_expert=self.store.expert_bytes,
            capacity=capacity,
            prefetch=prefetch,
            load_all=load_all,
            prefetch_k=prefetch_k,
            lookahead=lookahead,
        )
        self.record = record
        self.reset_stats()

    def _block(self, i: int):
        return _OffloadedBlock(self, i)

    def forward(self, ids_BxL, cache=None, prepared=None):
        ids = self.check(ids_BxL)
        self._new_call()
        out = forward(self.staged, ids, cache=cache)
        return out.logits_BxLxV, out.cache

    def _new_call(self) -> None:
        self._guessed, self._pending = {}, {}  # layer -> guessed set / {expert: read}

    def stats(self) -> dict:
        s = self._stats
        return dict(
            dataclasses.asdict(s),
            cache_hit_rate=s.hit_rate,
            prefetch_recall=s.prefetch_recall,
            expert_recall=s.expert_recall,
        )

    def reset_stats(self) -> None:
        """Empties the expert caches, zeroes the counters and the recorded trace."""
        self.cache = {i: collections.OrderedDict() for i in self.moe_layers}
        self._stats = ExpertStats()
        # record=True: each MoE layer's sequence of needed-expert sets (offload/policies.py)
        self.trace = {i: [] for i in sorted(self.moe_layers)} if self.record else None

    def resident_bytes(self) -> int:
        """Resident parameters plus the experts currently held in the caches (as held: a
        quantised store's experts are cached dequantised)."""
        held = [self.staged.params, *(list(c.values()) for c in self.cache.values())]
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(held)))

    def guess_layer(self, i: int) -> int | None:
        """The MoE layer block i's state guesses experts for: `lookahead` MoE layers on (None:
        no prefetch from here). Counted in MoE layers, so a model with MoE on every other block
        prefetches too."""
        order = sorted(self.moe_layers)
        k = order.index(i) + self.lookahead if i in self.moe_layers else len(order)
        return order[k] if self.prefetch and k < len(order) else None

    def load(self, i: int, experts_TxK: np.ndarray, guess):
        """The loader hook of MoE block i: (local ids [T, K], up [S, D, F], down [S, F, D]) for
        the set of experts the router chose, S padded to a power of two (unless `exact_slots`).
        Starts reading the guessed experts of layer `guess_layer(i)` first, so that they arrive
        while the layers before it compute."""
        j = self.guess_layer(i)
        if guess is not None and j is not None:
            g = {int(e) for e in np.unique(np.asarray(guess))}
            self._guessed[j] = g
            pending = self._pending.setdefault(j, {})
            for e in g - set(self.cache[j]) - set(pending):
                pending[e] = self.store.start_read(j, e)
        need = sorted({int(e) for e in experts_TxK.ravel()})
        if self.load_all:  # the naive baseline: the whole layer is read, the chosen ones used
            rest = sorted(set(range(self.model_config.ffn.experts)) - set(need))
            for read in [self.store.start_read(i, e) for e in rest]:  # moved as a used one is
                jax.block_until_ready([self._to_device(t) for t in read.result()])
            self._stats.experts_read += len(rest)
            self._stats.bytes_read += len(rest) * self.store.expert_bytes
        have = self._gather(i, need)
        local = np.full(max(need) + 1, -1, np.int32)
        local[need] = np.arange(len(need), dtype=np.int32)
        pad = 0 if self.exact_slots else bucket(len(need)) - len(need)
        slots = [have[e] for e in need]
        up, down = (
            jnp.stack([s[j] for s in slots] + [jnp.zeros_like(slots[0][j])] * pad) for j in (0, 1)
        )
        return local[experts_TxK], up, down

    def _gather(self, i: int, need: list[int]) -> dict:
        """{expert: device weights} for `need`: cache hits, then the reads (prefetched ones
        first); every expert read enters the layer's LRU cache."""
        cache, st = self.cache[i], self._stats
        pending = self._pending.pop(i, {})
        st.lookups += len(need)
        if self.trace is not None:
            self.trace[i].append(set(need))
        st.predicted += len(self._guessed.pop(i, set()).intersection(need))
        st.ready += len(set(need) & (set(cache) | set(pending)))
        have = {e: cache[e] for e in need if e in cache}
        st.hits += len(have)
        for e in need:  # every miss is in flight before the first wait
            if e not in have and e not in pending:
                pending[e] = self.store.start_read(i, e)
        for e, read in pending.items():
            weights = tuple(self._to_device(t) for t in read.result())
            st.experts_read += 1
            st.bytes_read += self.store.expert_bytes
            if e in have or e not in need:
                self._insert(i, e, weights)  # a prefetched expert this call does not use
            else:
                have[e] = weights
        for e in need:
            self._insert(i, e, have[e])  # the experts just used become the most recent
        return have

    def _insert(self, layer: int, expert: int, weights) -> None:
        cache = self.cache[layer]
        if not self.capacity:
            return
        cache[expert] = weights
        cache.move_to_end(expert)
        while len(cache) > self.capacity:
            cache.popitem(last=False)


class _OffloadedBlock:
    """MoE block i with the host between its router and its experts (the loader hook)."""

    def __init__(self, engine: MoeOffloadEngine, i: int):
        self.engine, self.i = engine, i

    def __call__(self, h, ctx, pos_L, kv=None, index=None):
        eng, i, s = self.engine, self.i, self.engine.staged
        j = eng.guess_layer(i)
        a, x, kv, w, experts, guess = eng._attend_route(
            s.params, s.rest, i, h, pos_L, kv, index, j, eng.prefetch_k
        )
        local, up, down = eng.load(i, np.asarray(experts), guess)
        return eng._experts_fn(s.params, s.rest, i, a, x, w, local, up, down), {}, kv


def _attend_route(merge):
    def attend_route(p, r, i, h, pos_L, kv, index, guess_layer, prefetch_k):
        mod = merge(p, r)
        a, x, kv = mod.blocks[i].attend(h, pos_L, kv, index)
        routes = mod.blocks[i].ffn.route(x)
        guess = None
        if guess_layer is not None:  # that layer's router on this layer's state
            nxt = mod.blocks[guess_layer]
            guess = nxt.ffn.route(nxt.norm_ffn(a)).experts_TxK[:, :prefetch_k]
        return a, x, kv, routes.weights_TxK, routes.experts_TxK, guess

    return attend_route


def _experts(merge):
    def experts_residual(p, r, i, a, x, w, local_TxK, up_S, down_S):
        ffn = merge(p, r).blocks[i].ffn
        y, _ = ffn.apply_experts(x, w, local_TxK, up_S, down_S, dispatch="dropless")
        return a + y

    return experts_residual


def _device_weights(dtype: str):
    """An expert's weight as read from the store -> on the device (a quantised store's codes,
    scales and zeros are moved, then dequantised there to float32, the parameters' dtype)."""
    if dtype not in quant.GROUP_DTYPES:
        return jax.device_put
    return jax.jit(partial(quant.group_dequantize, dtype=dtype))


def bucket(n: int) -> int:
    """Number of expert slots a call compiles for: n rounded up to a power of two."""
    return 1 << max(0, (n - 1).bit_length())
