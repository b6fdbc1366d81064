"""The FFN protocol every kind implements: `ffn(x_BxLxD, ctx) -> (y_BxLxD, aux)`.

`ctx` carries what a layer may read besides its input: the token ids, the raw token embeddings and,
for layers whose output for a token depends only on the token id (`uses_token_table`), a table of
per-token outputs computed once per step for the step's distinct ids. The table seam is generic:
MoLE's unique-token training, its re-parameterised LUT and its offloaded LUT rows all arrive through
`ctx.table` (the layer's own table), and the backbone never asks which kind it is running.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx, struct


@struct.dataclass
class Ctx:
    """Per-forward context. ids_BxL: int32; emb_BxLxD: raw token embeddings in compute dtype;
    inv_BxL: row of each position in the token tables; table: this layer's table
    (<dtype>[G, U, ...] or [U, ...]), set by `model.forward` for the layer it runs; routes: what
    the kind's model-level Router computed for these positions (None without one)."""

    ids_BxL: jax.Array
    emb_BxLxD: jax.Array
    inv_BxL: jax.Array | None = None
    table: jax.Array | None = None
    routes: Any = None  # the model-level router's routes (kinds with a Router: pregated)
    train: bool = struct.field(pytree_node=False, default=False)


class FFN(nnx.Module):
    """Base class: subclasses set `uses_token_table` and implement `__call__`/`token_table`."""

    uses_token_table: bool = False

    def __call__(self, x_BxLxD, ctx: Ctx) -> tuple[jax.Array, dict[str, Any]]:
        raise NotImplementedError

    def token_table(self, emb_UxD) -> jax.Array:
        """Per-token part of the output for the distinct ids whose raw embeddings are `emb_UxD`."""
        raise NotImplementedError(f"{type(self).__name__} has no token table")
