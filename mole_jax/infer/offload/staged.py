"""The backbone's pieces jitted one at a time, for engines that put host work between them.

`model.forward` is the one forward pass; it calls `embed_ids`, `blocks[i](h, ctx, pos, kv,
index)` and `logits`. `StagedModel` provides those names over (graphdef, params, rest), each
piece its own jitted call, so an engine can hand `forward` blocks of its own: a MoE block whose
experts are loaded by the host once its router has picked them (`offload/moe.py`), or a pre-gated
block whose experts were read ahead (`offload/pregated.py`, which also stages the router). Blocks
the host need not enter run whole in one call (`StagedBlock`).

Staged blocks run kinds whose FFN reads nothing from `ctx` (dense, MoE); kinds with token
tables run in one jitted call instead (`engine.InMemoryEngine`, `offload/lut.py`).
"""

from __future__ import annotations

from functools import partial

import jax
from flax import nnx

from mole_jax.model.ffn.base import Ctx


class StagedModel:
    """`forward`'s view of a model whose pieces are jitted one by one."""

    table_layers = ()  # staged models run kinds without token tables

    def __init__(self, graphdef, params, rest, vocab_size: int):
        self.graphdef, self.params, self.rest = graphdef, params, rest
        self.vocab_size = vocab_size
        self.blocks: list = []
        merge = self.merge
        self._embed = jax.jit(lambda p, r, ids: merge(p, r).embed_ids(ids))
        self._logits = jax.jit(lambda p, r, h: merge(p, r).logits(h))
        self.block_fn = partial(jax.jit, static_argnums=(2,))(_whole_block(merge))

    def merge(self, p, r):
        """The model inside a jitted piece (`p` may lack parameters an offloaded form drops)."""
        return nnx.merge(self.graphdef, p, r)

    def embed_ids(self, ids_BxL):
        return self._embed(self.params, self.rest, ids_BxL)

    def logits(self, h_BxLxD):
        return self._logits(self.params, self.rest, h_BxLxD)


def _whole_block(merge):
    def block(p, r, i, h, pos_L, kv, index):
        h, _, kv = merge(p, r).blocks[i](h, Ctx(None, None), pos_L, kv, index)
        return h, kv

    return block


class StagedBlock:
    """Block i of a `StagedModel` in one jitted call; its aux statistics are not returned."""

    def __init__(self, model: StagedModel, i: int):
        self.model, self.i = model, i

    def __call__(self, h, ctx, pos_L, kv=None, index=None):
        m = self.model
        h, kv = m.block_fn(m.params, m.rest, self.i, h, pos_L, kv, index)
        return h, {}, kv
