"""`model.scan_layers`: runs of identical blocks as one `jax.lax.scan`, so XLA compiles one
block per run instead of one per layer (compile time stops growing with depth).

The parameters stay one module per layer (checkpoints, LUT export and the engines see the same
tree whether a run scans or not); a scan stacks its run's parameters at the start of the step
(one transient copy of the blocks' weights, and of their gradient in the backward pass) and
slices them back per layer. Blocks are identical when their graph definitions are equal
(same FFN kind and settings); a MoE placed on every other layer scans nothing (each run is one
block). Token tables handed in are stacked with their run; tables computed from ids are built
inside the layer's step. State that training updates (PEER's BatchNorm statistics) is written
back to each layer after the scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mole_jax.parallel.sharding import constrain


def runs_of_identical(blocks) -> list[list[int]]:
    """Consecutive layer indices whose blocks have the same graph definition."""
    runs: list[list[int]] = []
    last = None
    for i, block in enumerate(blocks):
        graphdef = nnx.graphdef(block)
        if runs and graphdef == last:
            runs[-1].append(i)
        else:
            runs.append([i])
        last = graphdef
    return runs


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def scan_blocks(blocks, run, h, ctx, pos_L, tables, emb_uniq):
    """(h, {layer: aux}) after every block, each run of identical blocks scanned. `run`:
    `model.remat_block`'s function (block, h, ctx, pos_L, kv, index, emb_uniq)."""
    auxes = {}
    for layers in runs_of_identical(blocks):
        has_table = tables is not None and layers[0] in tables
        graphdef = nnx.graphdef(blocks[layers[0]])
        params = _stack([nnx.state(blocks[i], nnx.Param) for i in layers])
        rest = _stack([nnx.state(blocks[i], nnx.Not(nnx.Param)) for i in layers])
        xs = (params, rest, _stack([tables[i] for i in layers]) if has_table else None)

        def step(h, x, graphdef=graphdef):
            p, r, table = x
            block = nnx.merge(graphdef, p, r)
            h, aux, _ = run(block, h, ctx.replace(table=table), pos_L, None, None, emb_uniq)
            h = constrain(h, "batch", "length", "embed")
            return h, (aux, nnx.state(block, nnx.Not(nnx.Param)))

        h, (aux, new_rest) = jax.lax.scan(step, h, xs)
        for j, i in enumerate(layers):
            auxes[i] = jax.tree.map(lambda a, j=j: a[j], aux)
            if jax.tree.leaves(new_rest):
                nnx.update(blocks[i], jax.tree.map(lambda a, j=j: a[j], new_rest))
    return h, auxes
