"""The shared Transformer backbone: embed -> blocks(attention, FFN) -> RMSNorm -> untied LM head.

Axis legend: B batch, L length, D model, V vocab, U distinct token ids in a step.
Blocks are pre-norm: a = h + Attn(norm(h)); h' = a + FFN(norm(a), ctx). The FFN of each block is
chosen by `ffn.build_ffn`; this file never branches on the kind. FFNs that declare
`uses_token_table` get a table of per-token outputs computed once for the distinct ids of the batch
(or handed in by the caller, as the LUT paths do) through `ctx.tables` / `ctx.inv_BxL`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mole_jax import ffn as ffn_lib
from mole_jax.attention import Attention, init_kv
from mole_jax.errors import DataError
from mole_jax.ffn.base import Ctx
from mole_jax.layers import RMSNorm, compute_dtype, normal


class Output(NamedTuple):
    logits_BxLxV: jax.Array  # float32
    aux: dict[str, Any]  # {'aux_loss': scalar, 'per_layer': {i: {...}}}
    cache: dict | None


def dedup_ids(ids_BxL, vocab_size: int):
    """Distinct ids of a batch padded to a static bound, and each position's row among them.

    Returns (uniq_U, inv_BxL) with uniq_U[inv_BxL] == ids_BxL. U = min(V, B*L): when the batch holds
    at least as many tokens as the vocabulary, the whole vocabulary is the table and inv is the ids.
    Padding rows (id 0) are never referenced, so they receive no gradient.
    """
    n = ids_BxL.size
    if vocab_size <= n:
        return jnp.arange(vocab_size, dtype=ids_BxL.dtype), ids_BxL
    uniq_U, inv = jnp.unique(ids_BxL.ravel(), size=n, fill_value=0, return_inverse=True)
    return uniq_U, inv.reshape(ids_BxL.shape)


def dedup_bucket(n: int, vocab_size: int) -> int:
    """Static table size for n distinct ids: n rounded up to a quarter octave (at most 25%
    padding, so a run compiles for a handful of sizes), capped at the vocabulary."""
    if n >= vocab_size:
        return vocab_size
    step = 2 ** max(0, n.bit_length() - 3)
    return min(vocab_size, -(-n // step) * step)


def host_dedup(ids: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`dedup_ids` on the host, with the table padded only to `dedup_bucket` of the true count.

    Returns (uniq_U, inv) as int32 numpy arrays, uniq_U[inv] == ids. Raises DataError for ids
    outside [0, vocab_size).
    """
    check_ids(ids, vocab_size)
    uniq, inv = unique_inverse(ids)
    size = dedup_bucket(len(uniq), vocab_size)
    if size == vocab_size:
        return np.arange(vocab_size, dtype=np.int32), ids.astype(np.int32)
    uniq_U = np.zeros(size, np.int32)
    uniq_U[: len(uniq)] = uniq
    return uniq_U, inv.reshape(ids.shape).astype(np.int32)


def unique_inverse(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(ids, return_inverse=True)` over the flattened ids. A decode step holds a
    handful of ids, for which numpy's sort machinery costs more than the work (about 50 us of
    a 2 ms step on this machine), so small inputs go through a dict."""
    flat = np.asarray(ids).ravel()
    if flat.size > 64:
        return np.unique(flat, return_inverse=True)
    values = flat.tolist()
    uniq = sorted(set(values))
    row = {t: i for i, t in enumerate(uniq)}
    return np.array(uniq, flat.dtype), np.array([row[t] for t in values], np.intp)


def check_ids(ids: np.ndarray, vocab_size: int) -> None:
    """Token ids must index the embedding; jnp.take would silently clamp them."""
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise DataError(
            f"token id {hi if hi >= vocab_size else lo} is outside the vocabulary [0, {vocab_size})"
            "; was the data tokenized with another tokenizer?"
        )


class Block(nnx.Module):
    def __init__(self, m, layer_idx: int, *, rngs: nnx.Rngs):
        self.norm_attn = RMSNorm(m.d_model, m.norm_eps)
        self.attn = Attention(m, rngs)
        self.norm_ffn = RMSNorm(m.d_model, m.norm_eps)
        self.ffn = ffn_lib.build_ffn(m, layer_idx, rngs=rngs)

    def __call__(self, h_BxLxD, ctx: Ctx, pos_L, kv=None, index=None):
        y, kv = self.attn(self.norm_attn(h_BxLxD), pos_L, kv, index)
        a_BxLxD = h_BxLxD + y
        y, aux = self.ffn(self.norm_ffn(a_BxLxD), ctx)
        return a_BxLxD + y, aux, kv


class Transformer(nnx.Module):
    def __init__(self, m, *, rngs: nnx.Rngs):
        self.vocab_size, self.d_model, self.dtype = m.vocab_size, m.d_model, m.dtype
        self.embed = nnx.Param(normal(m.init_std)(rngs.params(), (m.vocab_size, m.d_model)))
        self.blocks = nnx.List([Block(m, i, rngs=rngs) for i in range(m.n_layers)])
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        self.head = nnx.Param(normal(m.init_std)(rngs.params(), (m.d_model, m.vocab_size)))
        self.table_layers = tuple(i for i, b in enumerate(self.blocks) if b.ffn.uses_token_table)

    def token_tables(self, uniq_U) -> dict[int, jax.Array]:
        """{layer: per-token FFN outputs for ids uniq_U} for every layer that uses a token table."""
        emb_UxD = jnp.take(self.embed[...], uniq_U, axis=0).astype(compute_dtype(self))
        return {i: self.blocks[i].ffn.token_table(emb_UxD) for i in self.table_layers}

    def init_cache(self, batch: int, max_len: int, m) -> dict:
        layers = [init_kv(batch, max_len, m, compute_dtype(self)) for _ in self.blocks]
        return {"index": jnp.zeros((), jnp.int32), "layers": layers}

    def __call__(self, ids_BxL, *, tables=None, inv_BxL=None, cache=None, train=False) -> Output:
        """ids_BxL: int32 token ids (< vocab_size; checked by the callers that read user data).

        tables/inv_BxL: per-token tables for `table_layers` and each position's row in them; when
        omitted they are computed from the batch's distinct ids. cache: from `init_cache`; decoding
        appends at cache['index'] and returns the advanced cache in `Output.cache`.
        """
        emb_BxLxD = jnp.take(self.embed[...], ids_BxL, axis=0).astype(compute_dtype(self))
        if self.table_layers and tables is None:
            uniq_U, inv_BxL = dedup_ids(ids_BxL, self.vocab_size)
            tables = self.token_tables(uniq_U)
        ctx = Ctx(ids_BxL, emb_BxLxD, inv_BxL, tables, train)
        index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
        pos_L = index + jnp.arange(ids_BxL.shape[1], dtype=jnp.int32)
        h, auxes, kvs = emb_BxLxD, {}, []
        for i, block in enumerate(self.blocks):
            kv = None if cache is None else cache["layers"][i]
            h, auxes[i], kv = block(h, ctx, pos_L, kv, index)
            kvs.append(kv)
        logits = jnp.einsum("bld,dv->blv", self.norm(h), self.head[...].astype(h.dtype))
        new_cache = None if cache is None else {"index": index + ids_BxL.shape[1], "layers": kvs}
        aux_loss = sum((a["aux_loss"] for a in auxes.values() if "aux_loss" in a), jnp.float32(0))
        aux = {"aux_loss": aux_loss, "per_layer": {i: a for i, a in auxes.items() if a}}
        return Output(logits.astype(jnp.float32), aux, new_cache)


def build_model(m, seed: int = 0) -> Transformer:
    return Transformer(m, rngs=nnx.Rngs(params=seed))
