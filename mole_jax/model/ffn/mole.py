"""MoLE: mixture of lookup experts (Jie et al., ICML 2025).

Axis legend: B batch, L length, D model, F routed expert width, E experts, U distinct token ids.

    u = x (the post-attention RMSNormed state the block hands every FFN)
    g = softmax_fp32(u W_r)                       over ALL experts, no top-k
    out = FFN_shared(u) + sum_j g_j FFN_j(RMSNorm_exp(e))    e: the raw token embedding

The routed experts see only the token embedding, so their outputs are a function of the token id: a
table of U x E x D rows. With `impl='unique'` (default) the layer declares `uses_token_table`; the
model computes the table once for the step's distinct ids and the layer gathers its rows
(`ctx.table`, `ctx.inv_BxL`; see `routed_rows` for their groups). The same seam feeds the
exported LUT, in memory or read from storage. `impl='per_position'` computes all E experts at every
position (the naive reference). `expert_input='hidden'` is the ablation whose experts read u; it
cannot be re-parameterised into a LUT. The 'lut' form (`build_model(m, form="lut")`) is the
inference form: no expert weights and no expert norm, only the shared FFN and the router; the rows
always come from `ctx.table`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mole_jax.errors import require, require_one_of
from mole_jax.model.ffn import routing
from mole_jax.model.ffn.base import FFN, Ctx
from mole_jax.model.layers import (
    Mlp,
    RMSNorm,
    compute_dtype,
    expert_activation,
    ffn_params,
    normal,
    out_std,
    param,
    up_width,
)
from mole_jax.parallel.sharding import constrain

FORMS = ("train", "lut")
IMPLS = ("unique", "per_position")
EXPERT_INPUTS = ("embedding", "hidden")


@dataclasses.dataclass(frozen=True)
class Settings:
    experts: int
    d_expert: int  # width of each routed expert (paper: 4D)
    expert_input: str  # embedding (exportable as a LUT) | hidden (ablation)
    impl: str  # unique (experts once per distinct id) | per_position (naive reference)
    lb_coef: float
    z_coef: float
    nf4_block: int  # values per absmax scale in nf4 LUT exports
    nf3_block: int = 128  # values per absmax scale in nf3 LUT exports (Table 8)


class Layer(FFN):
    def __init__(self, m, layer_idx: int, *, form: str = "train", rngs: nnx.Rngs):
        c = m.ffn
        d, e, f = m.d_model, c.experts, c.d_expert
        init = normal(m.init_std)
        self.router = param(rngs, init, (d, e), ("embed", None))
        self.shared = Mlp(d, m.d_ff, m, rngs)
        lut_form = form == "lut"  # inference form: no experts, rows from a LUT
        require(
            not lut_form or c.expert_input == "embedding",
            "model.ffn.mole.expert_input='hidden': experts that read the hidden state have no LUT",
        )
        has_norm = c.expert_input == "embedding" and not lut_form
        self.norm_exp = RMSNorm(d, m.norm_eps) if has_norm else None
        up_shape = (e, d, up_width(m, f))  # (gated: [gate | up])
        self.up = None if lut_form else param(rngs, init, up_shape, ("experts", "embed", "mlp"))
        self.down = (
            None
            if lut_form
            else param(rngs, normal(out_std(m)), (e, f, d), ("experts", "mlp", "embed"))
        )
        self.uses_token_table = lut_form or (c.impl == "unique" and c.expert_input == "embedding")
        self.act, self.dtype = expert_activation(m), m.dtype
        self.lb_coef, self.z_coef = c.lb_coef, c.z_coef

    def experts(self, x_xD):
        """All E routed experts on inputs [..., D] -> [..., E, D]. On a mesh every device runs
        all E for its own rows: the weights are gathered whole but for the `mlp` split, as
        FSDP gathers any weight it uses."""
        dt = compute_dtype(self)
        up = constrain(self.up[...], None, None, "mlp").astype(dt)
        down = constrain(self.down[...], None, "mlp", None).astype(dt)
        h = jnp.einsum("...d,edf->...ef", x_xD, up)
        return jnp.einsum("...ef,efd->...ed", self.act(h), down)

    def token_table(self, emb_UxD):
        """<dtype>[U, E, D]: expert_j(RMSNorm_exp(Emb[id])) for each distinct id (the LUT rows)."""
        if self.up is None:
            raise ValueError("a MoLE layer in LUT form has no experts: pass the LUT rows as tables")
        return self.experts(self.norm_exp(emb_UxD))

    def routed_rows(self, x_BxLxD, ctx: Ctx):
        """<dtype>[B, L, E, D]: every routed expert's output at every position. Token tables come
        in G groups ([G, U, E, D]); the B rows of the batch are split evenly among them, each
        group's rows indexing their own table (G is the number of devices the batch is split
        over in training, 1 elsewhere)."""
        if self.uses_token_table:
            table_GxUxExD = ctx.table
            if table_GxUxExD.ndim == 3:  # [U, E, D]: one group
                table_GxUxExD = table_GxUxExD[None]
            b, n = ctx.inv_BxL.shape
            inv_GxBxL = ctx.inv_BxL.reshape(table_GxUxExD.shape[0], -1, n)
            rows = jax.vmap(lambda t, i: jnp.take(t, i, axis=0))(table_GxUxExD, inv_GxBxL)
            return rows.reshape(b, n, *rows.shape[3:])
        if self.norm_exp is not None:
            return self.experts(self.norm_exp(ctx.emb_BxLxD))
        return self.experts(x_BxLxD)

    def __call__(self, x_BxLxD, ctx: Ctx):
        logits_BxLxE = jnp.einsum("bld,de->ble", x_BxLxD.astype(jnp.float32), self.router[...])
        g_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1)
        rows = self.routed_rows(x_BxLxD, ctx)
        y = self.shared(x_BxLxD) + jnp.einsum("ble,bled->bld", g_BxLxE.astype(rows.dtype), rows)
        e = g_BxLxE.shape[-1]
        probs_TxE, logits_TxE = g_BxLxE.reshape(-1, e), logits_BxLxE.reshape(-1, e)
        aux = {"expert_load": probs_TxE.mean(axis=0)}
        if self.lb_coef or self.z_coef:  # off in the paper: they made MoLE worse (Table 4)
            top1_Tx1 = jnp.argmax(probs_TxE, axis=-1)[:, None]
            aux["lb_loss"] = routing.load_balance_loss(probs_TxE, top1_Tx1)
            aux["z_loss"] = routing.z_loss(logits_TxE)
            aux["aux_loss"] = self.lb_coef * aux["lb_loss"] + self.z_coef * aux["z_loss"]
        return y, aux


def validate(m) -> None:
    c, name = m.ffn, "model.ffn.mole"
    require(c.experts >= 1, f"{name}.experts={c.experts} must be >= 1")
    require(c.d_expert >= 1, f"{name}.d_expert={c.d_expert} must be >= 1")
    require_one_of(c.impl, IMPLS, f"{name}.impl")
    require_one_of(c.expert_input, EXPERT_INPUTS, f"{name}.expert_input")
    require(c.lb_coef >= 0 and c.z_coef >= 0, f"{name}.lb_coef and z_coef must be >= 0")
    require(c.nf4_block >= 1, f"{name}.nf4_block={c.nf4_block} must be >= 1")
    require(c.nf3_block >= 1, f"{name}.nf3_block={c.nf3_block} must be >= 1")


def account(m) -> dict:
    """Table 1 row 'MoLE + LUT offload' (per layer); training counts the routed experts."""
    c, d, v = m.ffn, m.d_model, m.vocab_size
    shared_router = ffn_params(m, d, m.d_ff) + d * c.experts
    experts = c.experts * ffn_params(m, d, c.d_expert)
    out = dict(
        params=shared_router + experts,
        norm_params=d if c.expert_input == "embedding" else 0,
        train_flops=2 * (shared_router + experts) + 2 * c.experts * d,
    )
    if c.expert_input == "embedding":  # the LUT form: experts offloaded as V x E x D values
        out.update(
            params_resident=shared_router,
            params_active=shared_router,
            flops=2 * shared_router + 2 * c.experts * d,
            lut_values=v * c.experts * d,
            lut_values_per_token=c.experts * d,
        )
    else:  # hidden-input experts stay experts at inference
        out.update(
            params_resident=shared_router + experts,
            params_active=shared_router + experts,
            flops=out["train_flops"],
        )
    return out
