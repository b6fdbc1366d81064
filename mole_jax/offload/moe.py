"""The MoE expert-offloading baseline: only the non-expert weights stay resident; each layer's
routed experts are loaded from an `ExpertStore` when the router picks them, through a per-layer
LRU cache of `capacity` experts, optionally with speculative prefetch.

The forward pass runs layer by layer with the host in the loop, because which experts a layer
needs is known only once its router has seen that layer's input:

    attention + router (jit) -> host: load the chosen experts (cache, else storage)
    -> experts on the chosen set only (jit, the same permute / grouped matmul as training)

Speculative prefetch (Eliseev & Mazur, 2023): layer i's post-attention state is also put through
layer i+1's norm and router; the experts that guess names are read in the background while layer
i computes. `stats` counts expert lookups, cache hits, experts read, bytes moved, and how many of
the needed experts the guess had named (prefetch recall).
"""

from __future__ import annotations

import collections
import dataclasses
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mole_jax.checkpoint import Checkpointer
from mole_jax.config import load_config
from mole_jax.errors import UserError
from mole_jax.ffn import kind_of_layer
from mole_jax.ffn.base import Ctx
from mole_jax.ffn.moe import grouped_ffn_blocked, permute, unpermute
from mole_jax.ffn.routing import top_k_gates
from mole_jax.layers import ACTIVATIONS, compute_dtype
from mole_jax.model import Transformer, check_ids
from mole_jax.offload.experts import NAMES, ExpertStore


@dataclasses.dataclass
class ExpertStats:
    lookups: int = 0  # (layer, expert) pairs a forward call needed, summed over calls
    hits: int = 0  # of those, already resident in the layer's cache
    predicted: int = 0  # of those, named by the speculative guess
    experts_read: int = 0  # experts read from storage (prefetched ones included)
    bytes_read: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def prefetch_recall(self) -> float:
        return self.predicted / self.lookups if self.lookups else 0.0


class MoeOffloadEngine:
    """Same interface as `inference.Engine` for `decode`: forward, init_cache, resident_bytes."""

    mode = "moe_offload"

    def __init__(
        self, workdir, step=None, store="experts", capacity=4, prefetch=False, record=False
    ):
        cfg = load_config(workdir)
        m = cfg.model
        if m.ffn.kind != "moe":
            raise UserError(f"{workdir} holds a '{m.ffn.kind}' model, not a MoE")
        if capacity < 0:
            raise UserError(f"expert cache capacity {capacity} must be >= 0")
        ckpt = Checkpointer(workdir)
        try:
            meta = ckpt.meta(step)
            self.store = ExpertStore.open(
                os.path.join(workdir, store), expect={"params_sha256": meta["params_sha256"]}
            )
            self.moe_layers = {i for i in range(m.n_layers) if kind_of_layer(m, i) == "moe"}
            abstract = nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0)))
            graphdef, like, rest = nnx.split(abstract, nnx.Param, ...)
            like = nnx.to_pure_dict(like)
            for i in self.moe_layers:  # never read: the experts stay in storage
                for name in NAMES:
                    del like["blocks"][i]["ffn"][name]
            self.params = ckpt.restore_subset(like, int(meta["step"]))
        finally:
            ckpt.close()
        self.cfg, self.step, self.capacity, self.prefetch = (
            cfg,
            int(meta["step"]),
            capacity,
            prefetch,
        )
        self.rest = nnx.to_pure_dict(rest)
        self.fns = _compiled(graphdef, m, self.moe_layers)
        self.cache = {i: collections.OrderedDict() for i in self.moe_layers}
        self.stats = ExpertStats()
        # record=True: each MoE layer's sequence of needed-expert sets (offload/policies.py)
        self.trace = {i: [] for i in sorted(self.moe_layers)} if record else None
        self.rows = None  # no LUT rows (`inference.Engine` compatibility)

    def init_cache(self, batch: int, length: int):
        from mole_jax.inference import new_cache

        return new_cache(self.cfg.model, batch, length)

    def resident_bytes(self) -> int:
        """Resident parameters plus the experts currently held in the caches."""
        params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.params))
        cached = sum(len(c) for c in self.cache.values()) * self.store.expert_bytes
        return int(params + cached)

    def forward(self, ids_BxL, cache=None):
        ids = np.asarray(ids_BxL, np.int32)
        check_ids(ids, self.cfg.model.vocab_size)
        p, r, f = self.params, self.rest, self.fns
        index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        h = f.embed(p, r, ids)
        kvs, guessed, pending = [], set(), {}
        for i in range(self.cfg.model.n_layers):
            kv = None if cache is None else cache["layers"][i]
            if i not in self.moe_layers:
                h, kv = f.dense_block(p, r, i, h, kv, index)
            else:
                a, x, kv, w, experts, guess = f.attn_route(p, r, i, h, kv, index, self.prefetch)
                nxt = (set(), {})
                if guess is not None:  # start reading layer i+1's guessed experts now
                    g = {int(e) for e in np.unique(np.asarray(guess))}
                    nxt = (
                        g,
                        {e: self.store.start_read(i + 1, e) for e in g - set(self.cache[i + 1])},
                    )
                h = self._experts(i, a, x, w, np.asarray(experts), guessed, pending)
                guessed, pending = nxt
            kvs.append(kv)
        logits = f.head(p, r, h)
        new_cache = None if cache is None else {"index": index + ids.shape[1], "layers": kvs}
        return logits, new_cache

    def loss(self, batch_BxL1) -> float:
        from mole_jax.losses import cross_entropy

        logits, _ = self.forward(batch_BxL1[:, :-1])
        return float(cross_entropy(logits, jnp.asarray(batch_BxL1[:, 1:])))

    def _experts(self, i, a, x, w, experts_TxK, guessed: set, pending: dict):
        """Layer i's routed experts for the chosen set: cache hits, then the reads (prefetched
        ones first), then one grouped matmul over the set padded to a power of two."""
        need = sorted({int(e) for e in experts_TxK.ravel()})
        cache, st = self.cache[i], self.stats
        st.lookups += len(need)
        if self.trace is not None:
            self.trace[i].append(set(need))
        st.predicted += len(guessed.intersection(need))
        have = {e: cache[e] for e in need if e in cache}
        st.hits += len(have)
        for e in need:  # every miss is in flight before the first wait
            if e not in have and e not in pending:
                pending[e] = self.store.start_read(i, e)
        for e, read in pending.items():
            weights = tuple(jax.device_put(t) for t in read.result())
            st.experts_read += 1
            st.bytes_read += self.store.expert_bytes
            if e in have or e not in need:
                self._insert(i, e, weights)  # a prefetched expert this call does not use
            else:
                have[e] = weights
        for e in need:
            self._insert(i, e, have[e])  # the experts just used become the most recent
        local = np.full(max(need) + 1, -1, np.int32)
        local[need] = np.arange(len(need), dtype=np.int32)
        pad = _bucket(len(need)) - len(need)
        slots = [have[e] for e in need]
        up, down = (
            jnp.stack([s[j] for s in slots] + [jnp.zeros_like(slots[0][j])] * pad) for j in (0, 1)
        )
        return self.fns.expert_out(self.params, self.rest, i, a, x, w, local[experts_TxK], up, down)

    def _insert(self, layer: int, expert: int, weights) -> None:
        cache = self.cache[layer]
        if not self.capacity:
            return
        cache[expert] = weights
        cache.move_to_end(expert)
        while len(cache) > self.capacity:
            cache.popitem(last=False)


def _bucket(n: int) -> int:
    """Number of expert slots a call compiles for: n rounded up to a power of two."""
    return 1 << max(0, (n - 1).bit_length())


def attention(block, h, kv, index):
    """A block's attention half: (post-attention residual a, norm_ffn(a), kv)."""
    pos_L = index + jnp.arange(h.shape[1], dtype=jnp.int32)
    y, kv = block.attn(block.norm_attn(h), pos_L, kv, index)
    a = h + y
    return a, block.norm_ffn(a), kv


def route(block, x):
    """(gate weights [T, K], experts [T, K]) of a MoE block's router for its FFN input x."""
    logits = x.reshape(-1, x.shape[-1]).astype(jnp.float32) @ block.ffn.router[...]
    return top_k_gates(logits, block.ffn.k, block.ffn.mode)[:2]


def _compiled(graphdef, m, moe_layers):
    """The jitted pieces of a layer-by-layer forward. Expert parameters are absent from `p`."""

    def model(p, r):
        full = jax.tree.map(lambda x: x, p)
        for i in moe_layers:
            for name in NAMES:
                full["blocks"][i]["ffn"][name] = jnp.zeros((0,), jnp.float32)
        return nnx.merge(graphdef, full, r)

    def embed(p, r, ids):
        mod = model(p, r)
        return jnp.take(mod.embed[...], ids, axis=0).astype(compute_dtype(mod))

    def dense_block(p, r, i, h, kv, index):
        block = model(p, r).blocks[i]
        a, x, kv = attention(block, h, kv, index)
        return a + block.ffn(x, Ctx(None, None))[0], kv

    def attn_route(p, r, i, h, kv, index, guess_next):
        mod = model(p, r)
        a, x, kv = attention(mod.blocks[i], h, kv, index)
        w, experts = route(mod.blocks[i], x)
        guess = None
        if guess_next and i + 1 in moe_layers:
            nxt = mod.blocks[i + 1]
            guess = route(nxt, nxt.norm_ffn(a))[1]
        return a, x, kv, w, experts, guess

    def expert_out(p, r, i, a, x, w, local_TxK, up_S, down_S):
        ffn = model(p, r).blocks[i].ffn
        dt, act = compute_dtype(m), ACTIVATIONS[m.activation]
        x_TxD = x.reshape(-1, x.shape[-1])
        x_AxD, order_A, sizes_S = permute(x_TxD, local_TxK, up_S.shape[0])
        y_AxD = grouped_ffn_blocked(
            x_AxD, sizes_S, up_S.astype(dt), down_S.astype(dt), act, ffn.tile
        )
        y_TxD = unpermute(y_AxD, order_A, w)
        if ffn.shared is not None:
            y_TxD = y_TxD + ffn.shared(x_TxD)
        return a + y_TxD.reshape(a.shape)

    def head(p, r, h):
        mod = model(p, r)
        return jnp.einsum("bld,dv->blv", mod.norm(h), mod.head[...].astype(h.dtype)).astype(
            jnp.float32
        )

    static = partial(jax.jit, static_argnums=(2,))
    return _Fns(
        embed=jax.jit(embed),
        dense_block=static(dense_block),
        attn_route=jax.jit(attn_route, static_argnums=(2, 6)),
        expert_out=static(expert_out),
        head=jax.jit(head),
    )


@dataclasses.dataclass(frozen=True)
class _Fns:
    embed: object
    dense_block: object
    attn_route: object
    expert_out: object
    head: object
