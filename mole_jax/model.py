"""The shared Transformer backbone: embed -> blocks(attend, ffn) -> RMSNorm -> untied LM head.

Axis legend: B batch, L length, D model, V vocab, U distinct token ids in a step.
Blocks are pre-norm: a = h + Attn(norm(h)); h' = a + FFN(norm(a), ctx). The FFN of each block is
chosen by `ffn.build_ffn`; this file never branches on the kind. FFNs that declare
`uses_token_table` get a table of per-token outputs computed once for the distinct ids of the batch
(or handed in by the caller, as the LUT paths do) through `ctx.tables` / `ctx.inv_BxL`.

`forward` is the one forward pass. A `Transformer` runs it inside jit; an engine whose layers need
the host between pieces (a MoE with offloaded experts loads the experts its router picked) runs
the same function over staged pieces with the same names (`offload/staged.py`).

Forms (`build_model(m, form)`): 'train' holds every parameter; 'lut' is MoLE's inference form
(routed experts absent, their rows arrive as token tables); 'offload' is a MoE without its routed
experts (their weights arrive as arguments of `apply_experts`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mole_jax import ffn as ffn_lib
from mole_jax.attention import Attention, init_kv
from mole_jax.dedup import dedup_ids
from mole_jax.errors import UserError, require
from mole_jax.ffn.base import Ctx
from mole_jax.layers import RMSNorm, compute_dtype, normal

FORMS = ("train", "lut", "offload")


class Output(NamedTuple):
    logits_BxLxV: jax.Array  # float32
    aux: dict[str, Any]  # {'aux_loss': scalar, 'per_layer': {i: {...}}}
    cache: dict | None


class Block(nnx.Module):
    def __init__(self, m, layer_idx: int, *, form: str = "train", rngs: nnx.Rngs):
        self.norm_attn = RMSNorm(m.d_model, m.norm_eps)
        self.attn = Attention(m, rngs)
        self.norm_ffn = RMSNorm(m.d_model, m.norm_eps)
        self.ffn = ffn_lib.build_ffn(m, layer_idx, form=form, rngs=rngs)

    def attend(self, h_BxLxD, pos_L, kv=None, index=None):
        """(a, x, kv): the residual after attention, the FFN's input norm_ffn(a), and the
        layer's KV cache with this call's keys and values written at `index` (None: no cache)."""
        y, kv = self.attn(self.norm_attn(h_BxLxD), pos_L, kv, index)
        a_BxLxD = h_BxLxD + y
        return a_BxLxD, self.norm_ffn(a_BxLxD), kv

    def __call__(self, h_BxLxD, ctx: Ctx, pos_L, kv=None, index=None):
        a_BxLxD, x_BxLxD, kv = self.attend(h_BxLxD, pos_L, kv, index)
        y, aux = self.ffn(x_BxLxD, ctx)
        return a_BxLxD + y, aux, kv


class Transformer(nnx.Module):
    def __init__(self, m, *, form: str = "train", rngs: nnx.Rngs):
        self.vocab_size, self.d_model, self.dtype = m.vocab_size, m.d_model, m.dtype
        self.embed = nnx.Param(normal(m.init_std)(rngs.params(), (m.vocab_size, m.d_model)))
        self.blocks = nnx.List([Block(m, i, form=form, rngs=rngs) for i in range(m.n_layers)])
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        self.head = nnx.Param(normal(m.init_std)(rngs.params(), (m.d_model, m.vocab_size)))
        self.table_layers = tuple(i for i, b in enumerate(self.blocks) if b.ffn.uses_token_table)

    def embed_ids(self, ids_BxL):
        """The raw token embeddings in the compute dtype."""
        return jnp.take(self.embed[...], ids_BxL, axis=0).astype(compute_dtype(self))

    def token_tables(self, uniq_U, layers=None) -> dict[int, jax.Array]:
        """{layer: per-token FFN outputs for ids uniq_U} for `layers` (default: every layer whose
        forward reads a token table)."""
        emb_UxD = self.embed_ids(uniq_U)
        layers = self.table_layers if layers is None else layers
        return {i: self.blocks[i].ffn.token_table(emb_UxD) for i in layers}

    def logits(self, h_BxLxD):
        """float32 [B, L, V]: the final norm and the LM head."""
        out = jnp.einsum("bld,dv->blv", self.norm(h_BxLxD), self.head[...].astype(h_BxLxD.dtype))
        return out.astype(jnp.float32)

    def __call__(self, ids_BxL, *, tables=None, inv_BxL=None, cache=None, train=False) -> Output:
        return forward(self, ids_BxL, tables=tables, inv_BxL=inv_BxL, cache=cache, train=train)


def forward(model, ids_BxL, *, tables=None, inv_BxL=None, cache=None, train=False) -> Output:
    """embed -> every block -> logits. ids_BxL: int32 token ids (< vocab_size; checked by the
    callers that read user data).

    `model`: a Transformer, or staged pieces with the same names (embed_ids, token_tables,
    table_layers, vocab_size, blocks, logits). tables/inv_BxL: per-token tables for
    `table_layers` and each position's row in them; when omitted they are computed from the
    batch's distinct ids. cache: from `new_cache`; decoding appends at cache['index'] and returns
    the advanced cache in `Output.cache`.
    """
    emb_BxLxD = model.embed_ids(ids_BxL)
    if model.table_layers and tables is None:
        uniq_U, inv_BxL = dedup_ids(ids_BxL, model.vocab_size)
        tables = model.token_tables(uniq_U)
    ctx = Ctx(ids_BxL, emb_BxLxD, inv_BxL, tables, train)
    index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
    pos_L = index + jnp.arange(ids_BxL.shape[1], dtype=jnp.int32)
    h, auxes, kvs = emb_BxLxD, {}, []
    for i, block in enumerate(model.blocks):
        kv = None if cache is None else cache["layers"][i]
        h, auxes[i], kv = block(h, ctx, pos_L, kv, index)
        kvs.append(kv)
    logits = model.logits(h)
    new_cache = None if cache is None else {"index": index + ids_BxL.shape[1], "layers": kvs}
    aux_loss = sum((a["aux_loss"] for a in auxes.values() if "aux_loss" in a), jnp.float32(0))
    aux = {"aux_loss": aux_loss, "per_layer": {i: a for i, a in auxes.items() if a}}
    return Output(logits, aux, new_cache)


def new_cache(m, batch: int, length: int) -> dict:
    """An empty KV cache of the typed model config `m` for `length` positions (refused beyond
    model.max_seq_len)."""
    if length > m.max_seq_len:
        raise UserError(f"{length} tokens exceed model.max_seq_len={m.max_seq_len}")
    layers = [init_kv(batch, length, m, compute_dtype(m)) for _ in range(m.n_layers)]
    return {"index": jnp.zeros((), jnp.int32), "layers": layers}


def build_model(m, form: str = "train", seed: int = 0) -> Transformer:
    """The model of the typed config `m` (`model_config.ModelConfig`) in `form`."""
    forms = ffn_lib.KINDS[m.kind].FORMS
    require(form in forms, f"a '{m.kind}' model has no '{form}' form (it has {', '.join(forms)})")
    return Transformer(m, form=form, rngs=nnx.Rngs(params=seed))


def abstract_model(m, form: str = "train") -> Transformer:
    """The model's structure, shapes and dtypes without allocating a parameter."""
    return nnx.eval_shape(lambda: build_model(m, form))
