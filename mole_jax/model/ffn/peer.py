"""PEER: product-key retrieval over N = n^2 single-neuron experts (He, 2024).

Axis legend: T tokens, D model, H heads, C query/key dim per half (d_key / 2), n sub-keys per
half, k experts per head, N = n * n experts.

Per head, the query q = BN(x W_q) is split into halves q1, q2; each half scores its n sub-keys,
keeps its top-k, and the exact top-k of the k*k candidate sums q1.c_i + q2.c'_j are the chosen
experts i*n + j (the top-k of a sum of two independent scores lies in the product of the two
top-k lists, so this equals brute force over all N). Expert e(x) = act(u_e . x) v_e, weighted by
a softmax over each head's k scores and summed over heads. Only the chosen u, v rows are gathered.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mole_jax.errors import require, require_one_of
from mole_jax.model.ffn.base import FFN, Ctx
from mole_jax.model.layers import ACTIVATIONS, compute_dtype, linear, normal, param


def product_key_topk(q_TxHxDk, keys1_HxNxC, keys2_HxNxC, k: int):
    """(scores <float32>[T, H, k], experts <int32>[T, H, k]) by product-key search."""
    t, h, dk = q_TxHxDk.shape
    n, c = keys1_HxNxC.shape[1], dk // 2
    keys1 = jnp.broadcast_to(keys1_HxNxC, (h, n, c))  # shared keys have a head axis of 1
    keys2 = jnp.broadcast_to(keys2_HxNxC, (h, n, c))
    s1_TxHxN = jnp.einsum("thc,hnc->thn", q_TxHxDk[..., :c], keys1)
    s2_TxHxN = jnp.einsum("thc,hnc->thn", q_TxHxDk[..., c:], keys2)
    top1, i1 = jax.lax.top_k(s1_TxHxN, k)
    top2, i2 = jax.lax.top_k(s2_TxHxN, k)
    cand_TxHxKK = (top1[..., :, None] + top2[..., None, :]).reshape(t, h, k * k)
    scores, pos = jax.lax.top_k(cand_TxHxKK, k)
    i = jnp.take_along_axis(i1, pos // k, axis=-1)
    j = jnp.take_along_axis(i2, pos % k, axis=-1)
    return scores, (i * n + j).astype(jnp.int32)


def slot_mass(experts_TxHxK, weights_TxHxK, n_experts: int):
    """<float32>[N]: the router weight each expert received, summed over tokens and heads."""
    return (
        jnp.zeros((n_experts,), jnp.float32)
        .at[experts_TxHxK.ravel()]
        .add(weights_TxHxK.ravel().astype(jnp.float32))
    )


def usage_from_mass(mass_N):
    """(usage, unevenness): the share of experts chosen at least once, and the KL divergence of
    the accumulated router mass from uniform (PEER's 'unevenness', its Table 2)."""
    xp = jnp if isinstance(mass_N, jax.Array) else np
    n = mass_N.shape[0]
    p_N = mass_N / mass_N.sum()
    kl = xp.sum(xp.where(p_N > 0, p_N * xp.log(xp.where(p_N > 0, p_N, 1.0) * n), 0.0))
    return xp.mean(mass_N > 0), kl


def usage_stats(experts_TxHxK, weights_TxHxK, n_experts: int):
    """(usage, unevenness) of one batch (`usage_from_mass` of its `slot_mass`)."""
    return usage_from_mass(slot_mass(experts_TxHxK, weights_TxHxK, n_experts))


def usage_aux(experts_TxHxK, weights_TxHxK, n_experts: int, train: bool) -> dict:
    """A product-key layer's aux: this batch's usage and unevenness; outside training also the
    slot mass, which engines accumulate over a whole evaluation (`engine.InMemoryEngine`)."""
    mass = slot_mass(experts_TxHxK, weights_TxHxK, n_experts)
    usage, unevenness = usage_from_mass(mass)
    aux = {"usage": usage, "unevenness": unevenness}
    return aux if train else dict(aux, mass=mass)


FORMS = ("train",)


@dataclasses.dataclass(frozen=True)
class Settings:
    sub_keys: int  # n sub-keys per half of the product key; N = n^2 experts
    heads: int
    topk: int  # experts per head
    d_key: int  # query/key width (two halves)
    query_bn: bool  # BatchNorm on the query: batch statistics in training, running in eval
    bn_momentum: float
    shared_keys: bool  # one set of product keys for all heads
    activation: str  # sigma of e(x) = sigma(u.x) v


class ProductKeys(FFN):
    """What PEER and PKM share: the (BatchNorm'd) query and the product keys of every head;
    `retrieve` gives each token's k slots per head and their softmax weights."""

    def __init__(self, m, rngs: nnx.Rngs):
        c = m.ffn
        n, d, dk = c.sub_keys, m.d_model, c.d_key
        init = normal(m.init_std)
        self.query = linear(d, c.heads * dk, m, rngs, ("embed", None))
        self.bn = (
            nnx.BatchNorm(c.heads * dk, momentum=c.bn_momentum, rngs=rngs) if c.query_bn else None
        )
        key_heads = 1 if c.shared_keys else c.heads
        self.keys1 = param(rngs, init, (key_heads, n, dk // 2), (None, "keys", None))
        self.keys2 = param(rngs, init, (key_heads, n, dk // 2), (None, "keys", None))
        self.heads, self.d_key, self.k, self.dtype = c.heads, dk, c.topk, m.dtype

    def retrieve(self, x_TxD, ctx: Ctx):
        """(weights <float32>[T, H, k], slots <int32>[T, H, k])."""
        q = self.query(x_TxD).astype(jnp.float32)
        if self.bn is not None:
            q = self.bn(q, use_running_average=not ctx.train)
        q_TxHxDk = q.reshape(x_TxD.shape[0], self.heads, self.d_key)
        scores, slots = product_key_topk(q_TxHxDk, self.keys1[...], self.keys2[...], self.k)
        return jax.nn.softmax(scores, axis=-1), slots


class Layer(ProductKeys):
    def __init__(self, m, layer_idx: int, *, form: str = "train", rngs: nnx.Rngs):
        super().__init__(m, rngs)
        n, d, init = m.ffn.sub_keys, m.d_model, normal(m.init_std)
        self.u = param(rngs, init, (n * n, d), ("rows", "embed"))  # expert input weights
        self.v = param(rngs, init, (n * n, d), ("rows", "embed"))  # expert output weights
        self.act_name = m.ffn.activation

    def __call__(self, x_BxLxD, ctx: Ctx):
        b, n, d = x_BxLxD.shape
        x_TxD = x_BxLxD.reshape(b * n, d)
        weights_TxHxK, experts = self.retrieve(x_TxD, ctx)
        dt = compute_dtype(self)
        u_TxHxKxD = self.u[...][experts].astype(dt)
        v_TxHxKxD = self.v[...][experts].astype(dt)
        act = ACTIVATIONS[self.act_name](jnp.einsum("td,thkd->thk", x_TxD, u_TxHxKxD))
        coef = (weights_TxHxK.astype(dt) * act).astype(dt)
        y_TxD = jnp.einsum("thk,thkd->td", coef, v_TxHxKxD)
        return y_TxD.reshape(b, n, d), usage_aux(experts, weights_TxHxK, self.u.shape[0], ctx.train)


def validate_product_keys(c, name: str) -> None:
    """The fields PEER and PKM share (`ProductKeys`), each refused in one line naming it."""
    require(c.sub_keys >= 1, f"{name}.sub_keys={c.sub_keys} (N = sub_keys^2) must be >= 1")
    require(c.heads >= 1, f"{name}.heads={c.heads} must be >= 1")
    require(
        1 <= c.topk <= c.sub_keys,
        f"{name}.topk={c.topk} must be between 1 and {name}.sub_keys={c.sub_keys}",
    )
    require(c.d_key >= 2 and c.d_key % 2 == 0, f"{name}.d_key={c.d_key} must be even and >= 2")
    require(0 < c.bn_momentum < 1, f"{name}.bn_momentum={c.bn_momentum} must be in (0, 1)")


def validate(m) -> None:
    validate_product_keys(m.ffn, "model.ffn.peer")
    require_one_of(m.ffn.activation, tuple(ACTIVATIONS), "model.ffn.peer.activation")


def account(m) -> dict:
    """Per-layer numbers of a PEER layer (FLOPs: query, sub-key scores, candidates, experts)."""
    c, d = m.ffn, m.d_model
    query = d * c.heads * c.d_key + (2 * c.heads * c.d_key if c.query_bn else 0)
    keys = (1 if c.shared_keys else c.heads) * c.sub_keys * c.d_key
    experts = 2 * c.sub_keys * c.sub_keys * d
    active_experts = c.heads * c.topk * 2 * d
    flops = (
        2 * d * c.heads * c.d_key
        + 2 * c.heads * c.sub_keys * c.d_key
        + c.heads * c.topk * c.topk
        + 2 * active_experts
    )
    return dict(
        params=query + keys + experts,
        params_resident=query + keys + experts,
        params_active=query + keys + active_experts,
        flops=flops,
    )
