"""Top-k routed mixture of experts: route -> permute -> grouped matmul -> unpermute.

Axis legend: T tokens, D model, F expert width, E experts, K chosen per token, A = T*K
assignments, C capacity per expert, N tiles, R rows of a tile.

Dispatch (`model.ffn.moe.dispatch`):
  dropless  every assignment is computed. Tokens are sorted by expert and the per-expert groups
            multiplied with `grouped`: `ragged` (jax.lax.ragged_dot) or `blocked` (each group
            padded to a multiple of `tile` rows, one batched matmul over tiles; exact). `auto`
            is blocked everywhere: ragged_dot is emulated on CPU and compiled densely over the
            experts for GPU (forward and backward) and TPU (weight gradients).
  capacity  GShard/Switch einsum dispatch with capacity ceil(capacity_factor * A / E); overflow
            assignments are dropped (their share is logged as `dropped`).

Routing (`model.ffn.moe.routing`):
  token_choice   each token picks its top-k experts (everything above).
  expert_choice  each expert picks its top-C tokens of each sequence, C = ceil(L * topk / E)
                 (Zhou et al. 2022, capacity factor = topk; the PEER paper's MoE baseline):
                 balanced by construction, a token may get 0..E experts (the share that got
                 none is logged as `unchosen`); router_mode, dispatch and capacity_factor do
                 not apply. A token's route depends on the later tokens of its sequence, so the
                 model is not causal: it trains and is evaluated teacher-forced (the papers'
                 use; the loss can see a little of the future), and decoding, offloading and
                 lm-eval scoring refuse it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mole_jax.errors import require, require_one_of
from mole_jax.model.ffn import routing
from mole_jax.model.ffn.base import FFN, Ctx
from mole_jax.model.ffn.expert_parallel import dropless_sharded, sharded_dispatch_axes
from mole_jax.model.layers import (
    Mlp,
    compute_dtype,
    expert_activation,
    ffn_params,
    normal,
    out_std,
    param,
    up_width,
)

FORMS = ("train", "offload")
DISPATCH = ("dropless", "capacity")
GROUPED = ("auto", "ragged", "blocked")
ROUTINGS = ("token_choice", "expert_choice")


def permute(x_TxD, experts_TxK, n_experts: int):
    """Assignments sorted by expert: (x_AxD, order_A, group_sizes_E). order_A[a] is the flat
    (token * K + slot) index of sorted assignment a."""
    order_A = jnp.argsort(experts_TxK.ravel(), stable=True)
    token_A = order_A // experts_TxK.shape[1]
    sizes_E = jnp.bincount(experts_TxK.ravel(), length=n_experts).astype(jnp.int32)
    return x_TxD[token_A], order_A, sizes_E


def unpermute(y_AxD, order_A, weights_TxK):
    """Inverse of `permute`, then the gate-weighted sum over each token's K experts."""
    t, k = weights_TxK.shape
    y_TKxD = jnp.zeros_like(y_AxD).at[order_A].set(y_AxD)
    y_TxKxD = y_TKxD.reshape(t, k, -1)
    return jnp.einsum("tk,tkd->td", weights_TxK.astype(y_AxD.dtype), y_TxKxD)


def dropless_ffn(x_TxD, experts_TxK, weights_TxK, up_ExDxF, down_ExFxD, act, grouped, tile):
    """Every assignment computed: permute -> grouped matmul -> unpermute. [T, D] -> [T, D]."""
    x_AxD, order_A, sizes_E = permute(x_TxD, experts_TxK, up_ExDxF.shape[0])
    if grouped == "ragged":
        y_AxD = grouped_ffn_ragged(x_AxD, sizes_E, up_ExDxF, down_ExFxD, act)
    else:
        y_AxD = grouped_ffn_blocked(x_AxD, sizes_E, up_ExDxF, down_ExFxD, act, tile)
    return unpermute(y_AxD, order_A, weights_TxK)


def dropless(x_TxD, experts_TxK, weights_TxK, up_ExDxF, down_ExFxD, act, grouped, tile):
    """`dropless_ffn` on one device, or per expert group under a mesh with expert/data axes
    (expert_parallel.py)."""
    local = functools.partial(dropless_ffn, act=act, grouped=grouped, tile=tile)
    axes = sharded_dispatch_axes()
    if axes is None:  # one device (or an engine without a mesh)
        return local(x_TxD, experts_TxK, weights_TxK, up_ExDxF, down_ExFxD)
    return dropless_sharded(local, x_TxD, experts_TxK, weights_TxK, up_ExDxF, down_ExFxD, axes)


def grouped_ffn_ragged(x_AxD, sizes_E, up_ExDxF, down_ExFxD, act):
    h_AxF = act(jax.lax.ragged_dot(x_AxD, up_ExDxF, sizes_E))
    return jax.lax.ragged_dot(h_AxF, down_ExFxD, sizes_E)


def grouped_ffn_blocked(x_AxD, sizes_E, up_ExDxF, down_ExFxD, act, tile: int):
    """Exact grouped FFN: every expert's rows padded to a multiple of `tile`, so each tile has one
    expert; the tiles run as one batched matmul with their expert's weights gathered. The tile
    shrinks to about A/E rows when there are few assignments, so a decode step does not pad
    each of its handful of rows to a full tile."""
    a, d = x_AxD.shape
    e = sizes_E.shape[0]
    tile = min(tile, 1 << (a // e).bit_length())  # few assignments (decoding): smaller tiles
    n_tiles = -(-(a + e * (tile - 1)) // tile)
    padded_E = -(-sizes_E // tile) * tile
    start_E = jnp.cumsum(sizes_E) - sizes_E
    pstart_E = jnp.cumsum(padded_E) - padded_E
    expert_A = jnp.repeat(jnp.arange(e), sizes_E, total_repeat_length=a)
    dest_A = pstart_E[expert_A] + jnp.arange(a) - start_E[expert_A]
    x_NxRxD = jnp.zeros((n_tiles * tile, d), x_AxD.dtype).at[dest_A].set(x_AxD)
    x_NxRxD = x_NxRxD.reshape(n_tiles, tile, d)
    tile_expert_N = jnp.searchsorted(jnp.cumsum(padded_E), jnp.arange(n_tiles) * tile, "right")
    tile_expert_N = jnp.minimum(tile_expert_N, e - 1)  # tail tiles hold only zero rows
    h = act(jnp.einsum("nrd,ndf->nrf", x_NxRxD, up_ExDxF[tile_expert_N]))
    y_NxRxD = jnp.einsum("nrf,nfd->nrd", h, down_ExFxD[tile_expert_N])
    return y_NxRxD.reshape(n_tiles * tile, d)[dest_A]


def capacity_ffn(x_TxD, experts_TxK, weights_TxK, up_ExDxF, down_ExFxD, act, factor: float):
    """(y_TxD, dropped share). Assignments claim slots in token order; overflow is dropped."""
    t, k = experts_TxK.shape
    e = up_ExDxF.shape[0]
    cap = max(1, math.ceil(factor * t * k / e))
    onehot_AxE = jax.nn.one_hot(experts_TxK.reshape(t * k), e, dtype=jnp.int32)
    pos_AxE = (jnp.cumsum(onehot_AxE, axis=0) - 1) * onehot_AxE
    keep_AxE = onehot_AxE * (pos_AxE < cap)
    slot_AxC = jax.nn.one_hot(pos_AxE.sum(-1), cap, dtype=x_TxD.dtype)
    mask_TxKxE = keep_AxE.reshape(t, k, e).astype(x_TxD.dtype)
    slot_TxKxC = slot_AxC.reshape(t, k, cap)
    dispatch = jnp.einsum("tke,tkc->tec", mask_TxKxE, slot_TxKxC)
    combine = jnp.einsum("tk,tke,tkc->tec", weights_TxK.astype(x_TxD.dtype), mask_TxKxE, slot_TxKxC)
    x_ExCxD = jnp.einsum("tec,td->ecd", dispatch, x_TxD)
    h = act(jnp.einsum("ecd,edf->ecf", x_ExCxD, up_ExDxF))
    y_ExCxD = jnp.einsum("ecf,efd->ecd", h, down_ExFxD)
    dropped = (t * k - keep_AxE.sum()) / (t * k)  # count first: exactly 0 when none drop
    return jnp.einsum("tec,ecd->td", combine, y_ExCxD), dropped


def expert_choice_ffn(x_BxLxD, logits_BxLxE, up_ExDxF, down_ExFxD, act, topk: int):
    """(y_BxLxD, chosen_BxL: how many experts took each token). Per sequence, expert e takes
    the C tokens with the largest router probability softmax(logits)[:, e] and adds
    prob * FFN_e(x) to each."""
    b, n, d = x_BxLxD.shape
    e = up_ExDxF.shape[0]
    cap = min(n, math.ceil(n * topk / e))
    probs_BxLxE = jax.nn.softmax(logits_BxLxE.astype(jnp.float32), axis=-1)
    gates_BxExC, tok_BxExC = jax.lax.top_k(probs_BxLxE.transpose(0, 2, 1), cap)
    x_BxExCxD = jax.vmap(lambda x, t: x[t])(x_BxLxD, tok_BxExC)
    h = act(jnp.einsum("becd,edf->becf", x_BxExCxD, up_ExDxF))
    y_BxExCxD = jnp.einsum("becf,efd->becd", h, down_ExFxD)
    y_BxExCxD = y_BxExCxD * gates_BxExC[..., None].astype(y_BxExCxD.dtype)

    def scatter(y_ExCxD, t_ExC):
        return jnp.zeros((n, d), y_ExCxD.dtype).at[t_ExC.ravel()].add(y_ExCxD.reshape(-1, d))

    chosen_BxL = jax.vmap(lambda t: jnp.zeros((n,), jnp.int32).at[t.ravel()].add(1))(tok_BxExC)
    return jax.vmap(scatter)(y_BxExCxD, tok_BxExC), chosen_BxL


@dataclasses.dataclass(frozen=True)
class Settings:
    experts: int
    topk: int
    d_expert: int  # width F of each routed expert
    shared_d_ff: int  # width of an always-on shared expert (0: none)
    router_mode: str  # topk_softmax | softmax_topk (routing.ROUTER_MODES)
    lb_coef: float
    z_coef: float
    dispatch: str  # dropless | capacity
    grouped: str  # auto | ragged | blocked (dropless grouped matmul)
    capacity_factor: float
    tile: int  # rows per tile of the blocked grouped matmul
    routing: str = "token_choice"  # or expert_choice (ROUTINGS); configs before it: token_choice


class Routes(NamedTuple):
    """A MoE layer's routing of T = B*L tokens."""

    weights_TxK: jax.Array  # float32 gate weights
    experts_TxK: jax.Array  # int32 expert ids
    probs_TxE: jax.Array  # float32 softmax over all experts
    logits_TxE: jax.Array  # float32 router logits


class Layer(FFN):
    """route -> apply_experts. In the 'offload' form the layer holds no expert weights: they
    are handed to `apply_experts` by whoever loads them (`offload/moe.py`)."""

    def __init__(self, m, layer_idx: int, *, form: str = "train", rngs: nnx.Rngs):
        c = m.ffn
        d, e, f = m.d_model, c.experts, c.d_expert
        init = normal(m.init_std)
        self.router = param(rngs, init, (d, e), ("embed", None))
        has_experts = form != "offload"
        up_shape = (e, d, up_width(m, f))  # (gated: [gate | up])
        self.up = param(rngs, init, up_shape, ("experts", "embed", "mlp")) if has_experts else None
        self.down = (
            param(rngs, normal(out_std(m)), (e, f, d), ("experts", "mlp", "embed"))
            if has_experts
            else None
        )
        self.shared = Mlp(d, c.shared_d_ff, m, rngs) if c.shared_d_ff else None
        self.k, self.mode, self.dispatch, self.factor = (
            c.topk,
            c.router_mode,
            c.dispatch,
            c.capacity_factor,
        )
        self.n_experts, self.lb_coef, self.z_coef, self.tile = e, c.lb_coef, c.z_coef, c.tile
        self.grouped = c.grouped  # 'auto' is resolved when traced, for the mesh's platform
        self.act, self.dtype, self.choice = expert_activation(m), m.dtype, c.routing

    def route(self, x_BxLxD) -> Routes:
        """The router in float32 over the flattened tokens."""
        logits_TxE = x_BxLxD.reshape(-1, x_BxLxD.shape[-1]).astype(jnp.float32) @ self.router[...]
        weights, experts, probs = routing.top_k_gates(logits_TxE, self.k, self.mode)
        return Routes(weights, experts, probs, logits_TxE)

    def apply_experts(self, x_BxLxD, weights_TxK, experts_TxK, up_ExDxF, down_ExFxD, dispatch=None):
        """(y_BxLxD, stats): the routed experts (ids index `up`/`down`, which may hold a subset
        of the layer's experts) gate-weighted, plus the shared expert. `dispatch` overrides the
        configured one (the offload engine always runs dropless)."""
        b, n, d = x_BxLxD.shape
        x_TxD = x_BxLxD.reshape(b * n, d)
        dt, act = compute_dtype(self), self.act
        up, down = up_ExDxF.astype(dt), down_ExFxD.astype(dt)
        stats = {}
        if (dispatch or self.dispatch) == "capacity":
            y_TxD, stats["dropped"] = capacity_ffn(
                x_TxD, experts_TxK, weights_TxK, up, down, act, self.factor
            )
        else:
            y_TxD = dropless(x_TxD, experts_TxK, weights_TxK, up, down, act,
                             resolve_grouped(self.grouped), self.tile)  # fmt: skip
        if self.shared is not None:
            y_TxD = y_TxD + self.shared(x_TxD)
        return y_TxD.reshape(b, n, d), stats

    def aux(self, routes: Routes) -> dict:
        lb = routing.load_balance_loss(routes.probs_TxE, routes.experts_TxK)
        z = routing.z_loss(routes.logits_TxE)
        return dict(
            aux_loss=self.lb_coef * lb + self.z_coef * z,
            lb_loss=lb,
            z_loss=z,
            expert_load=routing.expert_load(routes.experts_TxK, self.n_experts),
        )

    def expert_choice(self, x_BxLxD):
        dt = compute_dtype(self)
        logits_BxLxE = x_BxLxD.astype(jnp.float32) @ self.router[...]
        y, chosen_BxL = expert_choice_ffn(
            x_BxLxD.astype(dt), logits_BxLxE, self.up[...].astype(dt), self.down[...].astype(dt),
            self.act, self.k,
        )  # fmt: skip
        if self.shared is not None:
            y = y + self.shared(x_BxLxD)
        z = routing.z_loss(logits_BxLxE.reshape(-1, self.n_experts))
        stats = dict(aux_loss=self.z_coef * z, z_loss=z, unchosen=jnp.mean(chosen_BxL == 0))
        return y.astype(x_BxLxD.dtype), stats

    def __call__(self, x_BxLxD, ctx: Ctx):
        if self.choice == "expert_choice":
            return self.expert_choice(x_BxLxD)
        r = self.route(x_BxLxD)
        y, stats = self.apply_experts(
            x_BxLxD, r.weights_TxK, r.experts_TxK, self.up[...], self.down[...]
        )
        return y, {**stats, **self.aux(r)}


def resolve_grouped(grouped: str, platform: str | None = None) -> str:
    """`model.ffn.<kind>.grouped`, with 'auto' = the blocked matmul on every platform, as the
    compiled programs say: on CPU ragged_dot is emulated; XLA's GPU compiler turns it into a
    dense matmul over every expert, and TPU's computes its weight gradient densely over the
    experts (masked): compiled at the paper batch, MoE-34E 1b does 16.8x (H100) and 6.4x
    (v5p) the model's FLOPs through ragged_dot, 1.39x and 1.32x blocked (docs/scaling.md).
    `platform` is kept for the callers that pass the target's."""
    del platform
    return "blocked" if grouped == "auto" else grouped


def validate(m) -> None:
    c, name = m.ffn, "model.ffn.moe"
    require(c.experts >= 1, f"{name}.experts={c.experts} must be >= 1")
    require(
        1 <= c.topk <= c.experts,
        f"{name}.topk={c.topk} must be between 1 and {name}.experts={c.experts}",
    )
    require(c.d_expert >= 1, f"{name}.d_expert={c.d_expert} must be >= 1")
    require(c.shared_d_ff >= 0, f"{name}.shared_d_ff={c.shared_d_ff} must be >= 0")
    require_one_of(c.router_mode, routing.ROUTER_MODES, f"{name}.router_mode")
    require_one_of(c.dispatch, DISPATCH, f"{name}.dispatch")
    require_one_of(c.grouped, GROUPED, f"{name}.grouped")
    require(c.capacity_factor > 0, f"{name}.capacity_factor={c.capacity_factor} must be > 0")
    require(c.tile >= 1, f"{name}.tile={c.tile} must be >= 1")
    require(c.lb_coef >= 0 and c.z_coef >= 0, f"{name}.lb_coef and z_coef must be >= 0")
    require_one_of(c.routing, ROUTINGS, f"{name}.routing")
    require(
        c.routing == "token_choice" or c.lb_coef == 0,
        f"{name}.lb_coef={c.lb_coef}: expert_choice routing is balanced by construction; set 0",
    )


def causal(c: Settings) -> bool:
    """Whether a token's output depends only on it and earlier tokens (not under expert_choice)."""
    return c.routing == "token_choice"


def account(m) -> dict:
    """Table 1 rows 'MoE' and 'MoE + expert offload' (per layer)."""
    c, d = m.ffn, m.d_model
    fixed = d * c.experts + ffn_params(m, d, c.shared_d_ff)  # router + shared expert
    return routed_account(ffn_params(m, d, c.d_expert), c.experts, c.topk, fixed)


def routed_account(expert: int, experts: int, topk: int, fixed: int) -> dict:
    """The per-layer numbers of `experts` routed experts of `expert` parameters each, `topk` of
    them active per token, beside `fixed` always-used parameters."""
    active = fixed + topk * expert
    return dict(
        params=fixed + experts * expert,
        params_resident=fixed + experts * expert,
        params_active=active,
        flops=2 * active,
        offloadable_params=experts * expert,
        offload_resident_params=fixed + topk * expert,
    )
