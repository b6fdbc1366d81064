"""Read-ME's pre-gated MoE: one small causal router over the token ids picks each token's expert
path before the backbone runs; every pre-gated block applies its own expert i to path i.

Axis legend: B batch, L length, D model, R router width, N paths (experts per layer), K chosen
per token, F expert width, T = B*L tokens.

Router (`Router`, Read-ME Table 1 at the config's scale): its own embedding (V x R), one pre-norm
transformer block of width R (causal attention with RoPE, an R-wide MLP), a final RMSNorm and a
linear map to the N paths. It runs once per forward (`model.forward` calls the kind's `Router`
and hands the routes to every block through `ctx.routes`), with its own KV cache when decoding,
so a token's path depends on it and the tokens before it only. Experts are aligned across layers:
expert i of every block belongs to path i, so a token's path names every expert it will use
before the first block runs (the lookahead that prefetching and expert-aware batching need).
Read-ME's code routes hard top-1 with an unscaled expert output; to train from scratch the router
needs a gradient from the LM loss, so the gate is the chosen path's probability
(`router_mode` softmax_topk, Switch-style) unless `router_mode` says otherwise; `gate=one` is
Read-ME's hard routing (what a model converted from dense uses: its router is trained by
distillation, `convert.py`). An optional
permanent expert (width `permanent`) is always on, as Read-ME's permanent channels. The router's
load-balance and z-losses are counted once, by the first pre-gated block.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from mole_jax.errors import require, require_one_of
from mole_jax.model.attention import Attention, init_kv
from mole_jax.model.ffn import moe, routing
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

FORMS = ("train", "offload")  # offload: the blocks hold no routed experts (offload/pregated.py)


@dataclasses.dataclass(frozen=True)
class Settings:
    experts: int  # N routing paths = experts per pre-gated block
    topk: int  # paths per token (Read-ME: 1)
    d_expert: int  # width F of each routed expert
    permanent: int  # width of the always-on permanent expert (0: none)
    router_d: int  # router width R
    router_heads: int
    router_mode: str  # routing.ROUTER_MODES: how the chosen paths' gates are formed
    lb_coef: float
    z_coef: float
    grouped: str  # moe.GROUPED: the grouped matmul of the dropless dispatch
    tile: int
    gate: str = "prob"  # prob: the path's probability per router_mode | one: Read-ME's code


def router_config(m):
    """The router block's own typed config: width R, its heads, a dense R-wide MLP."""
    c = m.ffn
    return dataclasses.replace(
        m, d_model=c.router_d, n_heads=c.router_heads, d_ff=c.router_d, n_layers=1,
        kind="dense", ffn_layers=(), ffn=None, scan_layers=False, n_kv_heads=0, gated=False,
        tie_embeddings=False,
    )  # fmt: skip


class Router(nnx.Module):
    """ids -> (routes over the N paths, the router's KV cache)."""

    def __init__(self, m, rngs: nnx.Rngs):
        r, c = router_config(m), m.ffn
        self.embed = param(rngs, normal(m.init_std), (m.vocab_size, c.router_d), ("vocab", None))
        self.norm_attn = RMSNorm(c.router_d, m.norm_eps)
        self.attn = Attention(r, rngs)
        self.norm_mlp = RMSNorm(c.router_d, m.norm_eps)
        self.mlp = Mlp(c.router_d, c.router_d, r, rngs)
        self.norm = RMSNorm(c.router_d, m.norm_eps)
        self.out = param(rngs, normal(m.init_std), (c.router_d, c.experts), (None, None))
        self.k, self.mode, self.dtype, self.gate = c.topk, c.router_mode, m.dtype, c.gate

    def __call__(self, ids_BxL, pos_L, kv=None, index=None):
        h = jnp.take(self.embed[...], ids_BxL, axis=0).astype(self.dtype)
        y, kv = self.attn(self.norm_attn(h), pos_L, kv, index)
        h = h + y
        h = h + self.mlp(self.norm_mlp(h))
        logits_TxN = self.norm(h).reshape(-1, h.shape[-1]).astype(jnp.float32) @ self.out[...]
        weights, experts, probs = routing.top_k_gates(logits_TxN, self.k, self.mode)
        if self.gate == "one":  # hard routing, the expert output unscaled (no LM-loss gradient)
            weights = jnp.ones_like(weights)
        return moe.Routes(weights, experts, probs, logits_TxN), kv


def new_router_cache(m, batch: int, length: int, dtype) -> dict:
    return init_kv(batch, length, router_config(m), dtype)


class Layer(FFN):
    """Expert i of this block for path i, gate-weighted, plus the permanent expert."""

    def __init__(self, m, layer_idx: int, *, form: str = "train", rngs: nnx.Rngs):
        c = m.ffn
        d, n, f = m.d_model, c.experts, c.d_expert
        stored = form == "offload"
        self.up = None if stored else param(rngs, normal(m.init_std), (n, d, up_width(m, f)),
                                            ("experts", "embed", "mlp"))  # fmt: skip
        self.down = None if stored else param(rngs, normal(out_std(m)), (n, f, d),
                                              ("experts", "mlp", "embed"))  # fmt: skip
        self.permanent = Mlp(d, c.permanent, m, rngs) if c.permanent else None
        self.counts_router_loss = layer_idx == min(m.ffn_layers)
        self.lb_coef, self.z_coef, self.n_experts, self.tile = c.lb_coef, c.z_coef, n, c.tile
        self.grouped = c.grouped  # 'auto' is resolved when traced, for the mesh's platform
        self.act, self.dtype = expert_activation(m), m.dtype

    def apply_experts(self, x_BxLxD, weights_TxK, experts_TxK, up_SxDxF, down_SxFxD):
        """The routed experts (ids index `up`/`down`, which may hold a subset of the layer's
        experts: the offload engine hands in those it loaded) plus the permanent expert."""
        b, n, d = x_BxLxD.shape
        dt, act = compute_dtype(self), self.act
        y_TxD = moe.dropless(
            x_BxLxD.reshape(b * n, d), experts_TxK, weights_TxK, up_SxDxF.astype(dt),
            down_SxFxD.astype(dt), act, moe.resolve_grouped(self.grouped), self.tile,
        )  # fmt: skip
        y = y_TxD.reshape(b, n, d)
        if self.permanent is not None:
            y = y + self.permanent(x_BxLxD)
        return y

    def __call__(self, x_BxLxD, ctx: Ctx):
        r = ctx.routes
        y = self.apply_experts(x_BxLxD, r.weights_TxK, r.experts_TxK, self.up[...], self.down[...])
        stats = {"expert_load": routing.expert_load(r.experts_TxK, self.n_experts)}
        if self.counts_router_loss:
            lb = routing.load_balance_loss(r.probs_TxE, r.experts_TxK)
            z = routing.z_loss(r.logits_TxE)
            stats.update(aux_loss=self.lb_coef * lb + self.z_coef * z, lb_loss=lb, z_loss=z)
        return y, stats


def validate(m) -> None:
    c, name = m.ffn, "model.ffn.pregated"
    require(c.experts >= 1, f"{name}.experts={c.experts} must be >= 1")
    require(1 <= c.topk <= c.experts, f"{name}.topk={c.topk} must be in [1, {c.experts}]")
    require(c.d_expert >= 1 and c.permanent >= 0, f"{name}: d_expert >= 1 and permanent >= 0")
    require(
        c.router_d >= 2 and c.router_heads >= 1 and c.router_d % (2 * c.router_heads) == 0,
        f"{name}.router_d={c.router_d} must split into router_heads={c.router_heads} heads of "
        "even width",
    )
    require_one_of(c.router_mode, routing.ROUTER_MODES, f"{name}.router_mode")
    require_one_of(c.gate, ("prob", "one"), f"{name}.gate")
    require(
        not (c.topk == 1 and c.router_mode == "topk_softmax" and c.gate == "prob"),
        f"{name}.router_mode=topk_softmax with topk=1 gates every token by 1: the router would get "
        "no gradient; use softmax_topk",
    )
    require_one_of(c.grouped, moe.GROUPED, f"{name}.grouped")
    require(c.tile >= 1 and c.lb_coef >= 0 and c.z_coef >= 0, f"{name}: tile >= 1, coefs >= 0")


def account(m) -> dict:
    """Per pre-gated block: N experts, K of them active, plus the permanent expert."""
    c, d = m.ffn, m.d_model
    expert, permanent = ffn_params(m, d, c.d_expert), ffn_params(m, d, c.permanent)
    return moe.routed_account(expert, c.experts, c.topk, permanent)


def account_model(m, seq: int) -> dict:
    """The router, once per model: embedding V*R, attention 4R^2, MLP 2R^2, three norms, R*N."""
    r = m.ffn.router_d
    body = 4 * r * r + 2 * r * r + r * m.ffn.experts
    flops = 2 * body + 4 * seq * r
    params = m.vocab_size * r + body + 3 * r
    return dict(params=params, params_active=params, flops=flops)
