"""FFN kinds. `build_ffn` is the only place that knows them all.

Each kind is a module with `Layer(m, layer_idx, rngs=...)` (the FFN protocol in `base.py`),
`validate(m)` for its `model.ffn.<kind>` fields and `account(m)` for its per-layer numbers.
Adding a kind: write `ffn/<kind>.py` with those three names and add one line to KINDS.
"""

from __future__ import annotations

from flax import nnx

from mole_jax.config import layer_indices
from mole_jax.ffn import dense, moe, mole, peer

KINDS = {
    "dense": dense,
    "moe": moe,
    "peer": peer,
    "mole": mole,
}


def kind_of_layer(m, layer_idx: int) -> str:
    """The FFN kind of block `layer_idx`: the configured kind where placed, dense elsewhere."""
    return m.ffn.kind if layer_idx in layer_indices(m.ffn.layers, m.n_layers) else "dense"


def build_ffn(m, layer_idx: int, *, rngs: nnx.Rngs):
    return KINDS[kind_of_layer(m, layer_idx)].Layer(m, layer_idx, rngs=rngs)
