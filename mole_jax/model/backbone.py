"""The shared Transformer backbone: embed -> blocks(attend, ffn) -> RMSNorm -> untied LM head.

Axis legend: B batch, L length, D model, V vocab, U distinct token ids in a step.
Blocks are pre-norm: a = h + Attn(norm(h)); h' = a + FFN(norm(a), ctx). The FFN of each block is
chosen by `ffn.build_ffn`; this file never branches on the kind. FFNs that declare
`uses_token_table` get a table of per-token outputs computed once for the distinct ids of the batch
(or handed in by the caller, as the LUT paths do) through `ctx.table` / `ctx.inv_BxL`.

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

from mole_jax.data.dedup import dedup_ids
from mole_jax.errors import UserError, require
from mole_jax.model import ffn as ffn_lib
from mole_jax.model import scan as scan_lib
from mole_jax.model.attention import Attention, init_kv
from mole_jax.model.ffn.base import Ctx
from mole_jax.model.layers import RMSNorm, compute_dtype, normal, param
from mole_jax.parallel.sharding import constrain

FORMS = ("train", "lut", "offload")


class Output(NamedTuple):
    logits_BxLxV: jax.Array | None  # float32; None when run with head=False
    aux: dict[str, Any]  # {'aux_loss': scalar, 'per_layer': {i: {...}}}
    cache: dict | None
    hidden_BxLxD: jax.Array | None = None  # the final hidden state, before the final norm


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
        self.remat, self.scan_layers = m.remat, m.scan_layers
        init = normal(m.init_std)
        self.embed = param(rngs, init, (m.vocab_size, m.d_model), ("vocab", "embed"))
        self.blocks = nnx.List([Block(m, i, form=form, rngs=rngs) for i in range(m.n_layers)])
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        if not m.tie_embeddings:  # (tied: the head is the embedding table, transposed)
            self.head = param(rngs, init, (m.d_model, m.vocab_size), ("embed", "vocab"))
        self.table_layers = tuple(i for i, b in enumerate(self.blocks) if b.ffn.uses_token_table)
        if (kind := ffn_lib.router_module(m.kind)) is not None:
            self.router = kind.Router(m, rngs)

    def embed_ids(self, ids_BxL):
        """The raw token embeddings in the compute dtype. (With a mesh, the table's `embed` axis
        is gathered first, as FSDP gathers any weight before use: a lookup into a table split
        along D would give rows split along D, which the batch split cannot take.)"""
        table_VxD = constrain(self.embed[...], "vocab", None)
        return jnp.take(table_VxD, ids_BxL, axis=0).astype(compute_dtype(self))

    def token_tables(self, uniq, layers=None) -> dict[int, jax.Array]:
        """{layer: per-token FFN outputs for the ids `uniq`} for `layers` (default: every layer
        whose forward reads a token table). uniq: [G, U] (the groups of `forward`'s tables:
        split like the batch) or [U]."""
        emb = self.embed_ids(uniq)
        layers = self.table_layers if layers is None else layers
        return {i: layer_table(self.blocks[i].ffn, emb) for i in layers}

    def logits(self, h_BxLxD):
        """float32 [B, L, V]: the final norm and the LM head (the embedding table when tied)."""
        x = self.norm(h_BxLxD)
        if hasattr(self, "head"):
            out = jnp.einsum("bld,dv->blv", x, self.head[...].astype(x.dtype))
        else:
            out = jnp.einsum("bld,vd->blv", x, self.embed[...].astype(x.dtype))
        return constrain(out.astype(jnp.float32), "batch", "length", "vocab")

    def __call__(self, ids_BxL, **kwargs) -> Output:
        return forward(self, ids_BxL, **kwargs)


def forward(
    model, ids_BxL, *, tables=None, inv_BxL=None, uniq=None, cache=None, train=False, head=True
) -> Output:
    """embed -> every block -> logits. ids_BxL: int32 token ids (< vocab_size; checked by the
    callers that read user data).

    `model`: a Transformer, or staged pieces with the same names (embed_ids, token_tables,
    table_layers, vocab_size, blocks, logits). tables/inv_BxL: per-token tables for
    `table_layers` ({layer: [G, U, ...]}, G groups of the batch's rows, each with its own U
    rows) and each position's row in its group's table; or, instead of tables, `uniq` ([G, U]:
    the ids the tables are computed for). When both are omitted the tables are computed from the
    batch's distinct ids (one group). cache: from `new_cache`; decoding appends at
    cache['index'] and returns the advanced cache in `Output.cache`. head=False skips the LM
    head: `Output.hidden_BxLxD` holds the final hidden state for a loss that computes the
    logits in chunks. With `model.scan_layers` (and no cache) runs of identical blocks are one
    `lax.scan` (`scan.py`), each layer's table computed inside its step.
    """
    emb_BxLxD = constrain(model.embed_ids(ids_BxL), "batch", "length", "embed")
    if model.table_layers and tables is None and uniq is None:
        uniq_U, inv_BxL = dedup_ids(ids_BxL, model.vocab_size)
        uniq = uniq_U[None]
    scan = getattr(model, "scan_layers", False) and cache is None
    if uniq is not None and not scan:
        tables, uniq = model.token_tables(uniq), None
    index = jnp.zeros((), jnp.int32) if cache is None else cache["index"]
    pos_L = index + jnp.arange(ids_BxL.shape[1], dtype=jnp.int32)
    routes = router_kv = None
    if getattr(model, "router", None) is not None:
        kv = None if cache is None else cache["router"]
        routes, router_kv = model.router(ids_BxL, pos_L, kv, index)
    ctx = Ctx(ids_BxL, emb_BxLxD, inv_BxL, None, routes, train)
    run = remat_block(getattr(model, "remat", "none"))
    emb_uniq = None if uniq is None else model.embed_ids(uniq)
    if scan:
        h, auxes = scan_lib.scan_blocks(model.blocks, run, emb_BxLxD, ctx, pos_L, tables, emb_uniq)
        kvs = None
    else:
        h, auxes, kvs = emb_BxLxD, {}, []
        for i, block in enumerate(model.blocks):
            kv = None if cache is None else cache["layers"][i]
            table = None if tables is None else tables.get(i)
            h, auxes[i], kv = run(block, h, ctx.replace(table=table), pos_L, kv, index, None)
            h = constrain(h, "batch", "length", "embed")
            kvs.append(kv)
    logits = model.logits(h) if head else None
    new_cache = None if cache is None else {"index": index + ids_BxL.shape[1], "layers": kvs}
    if new_cache is not None and router_kv is not None:
        new_cache["router"] = router_kv
    aux_loss = sum((a["aux_loss"] for a in auxes.values() if "aux_loss" in a), jnp.float32(0))
    aux = {"aux_loss": aux_loss, "per_layer": {i: a for i, a in auxes.items() if a}}
    return Output(logits, aux, new_cache, None if head else h)


def layer_table(ffn, emb_UxD):
    """An FFN's token table for raw embeddings [G, U, D] (or [U, D]), its groups split like the
    batch."""
    table = ffn.token_table(emb_UxD)
    return constrain(table, "batch", *(None,) * (table.ndim - 1))


def run_layer(block, h, ctx, pos_L, kv=None, index=None, emb_uniq=None):
    """One block; with `emb_uniq` (raw embeddings of the table ids) a block whose FFN reads a
    token table computes its own first (inside the block's remat and scan step)."""
    if emb_uniq is not None and block.ffn.uses_token_table:
        ctx = ctx.replace(table=layer_table(block.ffn, emb_uniq))
    return block(h, ctx, pos_L, kv, index)


REMAT = ("none", "full", "dots")


def remat_block(policy: str):
    """How a block runs: as is ('none'); recomputed whole in the backward pass, saving only its
    input ('full'); or saving only its matmul outputs ('dots': jax's
    dots_with_no_batch_dims_saveable)."""
    if policy == "none":
        return run_layer
    saveable = (
        None if policy == "full" else jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    )
    return nnx.remat(run_layer, policy=saveable)


def new_cache(m, batch: int, length: int) -> dict:
    """An empty KV cache of the typed model config `m` for `length` positions (refused beyond
    model.max_seq_len)."""
    if length > m.max_seq_len:
        raise UserError(f"{length} tokens exceed model.max_seq_len={m.max_seq_len}")
    layers = [init_kv(batch, length, m, compute_dtype(m)) for _ in range(m.n_layers)]
    cache = {"index": jnp.zeros((), jnp.int32), "layers": layers}
    if (kind := ffn_lib.router_module(m.kind)) is not None:
        cache["router"] = kind.new_router_cache(m, batch, length, compute_dtype(m))
    return cache


def build_model(m, form: str = "train", seed: int = 0) -> Transformer:
    """The model of the typed config `m` (`model_config.ModelConfig`) in `form`."""
    forms = ffn_lib.KINDS[m.kind].FORMS
    require(form in forms, f"a '{m.kind}' model has no '{form}' form (it has {', '.join(forms)})")
    return Transformer(m, form=form, rngs=nnx.Rngs(params=seed))


def abstract_model(m, form: str = "train") -> Transformer:
    """The model's structure, shapes and dtypes without allocating a parameter."""
    return nnx.eval_shape(lambda: build_model(m, form))
