"""Dense FFN: down(GELU(up(x))), width d_ff. Also the layer every non-selected block gets."""

from __future__ import annotations

from flax import nnx

from mole_jax.model.ffn.base import FFN, Ctx
from mole_jax.model.layers import Mlp, ffn_params

FORMS = ("train",)


class Layer(FFN):
    def __init__(self, m, layer_idx: int, *, form: str = "train", rngs: nnx.Rngs):
        self.mlp = Mlp(m.d_model, m.d_ff, m, rngs)

    def __call__(self, x_BxLxD, ctx: Ctx):
        return self.mlp(x_BxLxD), {}


def validate(m) -> None:
    """Dense has no fields of its own; the backbone's are checked by config.validate."""


def account(m) -> dict:
    """Per-layer accounting (Table 1 row 'dense'): FLOPs count a multiply-add as 2."""
    p = ffn_params(m, m.d_model, m.d_ff)
    return dict(params=p, params_resident=p, params_active=p, flops=2 * p)
