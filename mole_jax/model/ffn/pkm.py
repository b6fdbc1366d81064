"""PKM: a product-key memory (Lample et al., 2019), the PEER paper's baseline.

Axis legend as in `peer.py`. Per head, a BatchNorm'd query is matched against product keys
(`peer.product_key_topk`: exact top-k over N = n^2 slots); the output is the softmax-weighted sum
of the chosen slots' value vectors, summed over heads (the heads share one memory of N values of
width D). PEER is this with each value replaced by a one-neuron expert act(u . x) v.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from mole_jax.model.ffn.base import Ctx
from mole_jax.model.ffn.peer import ProductKeys, usage_aux, validate_product_keys
from mole_jax.model.layers import compute_dtype, normal, param

FORMS = ("train",)


@dataclasses.dataclass(frozen=True)
class Settings:
    sub_keys: int  # n sub-keys per half of the product key; N = n^2 memory slots
    heads: int
    topk: int  # slots read per head
    d_key: int  # query/key width (two halves)
    query_bn: bool  # BatchNorm on the query: batch statistics in training, running in eval
    bn_momentum: float
    shared_keys: bool  # one set of product keys for all heads


class Layer(ProductKeys):
    def __init__(self, m, layer_idx: int, *, form: str = "train", rngs: nnx.Rngs):
        super().__init__(m, rngs)
        n, d = m.ffn.sub_keys, m.d_model
        self.values = param(rngs, normal(m.init_std), (n * n, d), ("rows", "embed"))

    def __call__(self, x_BxLxD, ctx: Ctx):
        b, n, d = x_BxLxD.shape
        weights_TxHxK, slots = self.retrieve(x_BxLxD.reshape(b * n, d), ctx)
        dt = compute_dtype(self)
        v_TxHxKxD = self.values[...][slots].astype(dt)
        y_TxD = jnp.einsum("thk,thkd->td", weights_TxHxK.astype(dt), v_TxHxKxD)
        return y_TxD.reshape(b, n, d), usage_aux(
            slots, weights_TxHxK, self.values.shape[0], ctx.train
        )


def validate(m) -> None:
    validate_product_keys(m.ffn, "model.ffn.pkm")


def account(m) -> dict:
    """Per-layer numbers of a PKM layer (FLOPs: query, sub-key scores, candidates, weighted sum
    of the chosen values)."""
    c, d = m.ffn, m.d_model
    query = d * c.heads * c.d_key + (2 * c.heads * c.d_key if c.query_bn else 0)
    keys = (1 if c.shared_keys else c.heads) * c.sub_keys * c.d_key
    values = c.sub_keys * c.sub_keys * d
    flops = (
        2 * d * c.heads * c.d_key
        + 2 * c.heads * c.sub_keys * c.d_key
        + c.heads * c.topk * c.topk
        + 2 * c.heads * c.topk * d
    )
    return dict(
        params=query + keys + values,
        params_resident=query + keys + values,
        params_active=query + keys + c.heads * c.topk * d,
        flops=flops,
    )
