"""Dropless MoE dispatch across a device mesh, exact and with every device sorting only its own
tokens (`jax.shard_map`).

Axis legend: T tokens (the local T_l inside), D model, F expert width, E experts (E_l local), K
chosen per token, G = ep the devices of the `expert` mesh axis.

Tokens are split over the batch axes (data, fsdp, expert); experts over `expert`, their width F
over `tensor` (a gated expert's [gate | up] as [2, F], so that a device holds the same columns
of both). Inside, each device
  1. all-gathers the tokens, routes and gates of its expert group (the G devices that share its
     data/fsdp coordinates and hold the G slices of the experts): G * T_l tokens;
  2. keeps the assignments to its E_l experts (the others go to a zero dummy group with gate 0)
     and runs the same permute -> grouped matmul -> unpermute as one device does;
  3. sums the partial outputs over `tensor` (F was split) and reduce-scatters them over `expert`,
     so each device gets its own T_l tokens back, every one with all K experts applied.
Each assignment is computed once, on the device that holds its expert, and a token's output is
the sum of its K gated expert outputs and zeros: the one-device result up to the rounding of
differently shaped matmuls (and, with F split over `tensor`, of the split down projection).

Why this and not an all-to-all: it has the same static, worst-case-sized buffers any exact
dropless dispatch needs without ragged collectives (`jax.lax.ragged_all_to_all` is not
implemented on CPU), it needs no capacity, and its two collectives are the ones GSPMD already
uses for FSDP. The price is G * T_l * K rows through each device's grouped matmul (the local
ones carry weight, the rest are zero rows of the dummy group).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mole_jax.parallel import sharding


def sharded_dispatch_axes():
    """(batch axes, expert axes, tensor axes) of the current mesh (each of size > 1); None when
    no mesh is set (one device: the local dispatch runs)."""
    if sharding.current_mesh() is None:
        return None
    return sharding.mesh_axes("batch"), sharding.mesh_axes("experts"), sharding.mesh_axes("mlp")


def dropless_sharded(local_ffn, x_TxD, experts_TxK, weights_TxK, up_ExDxF, down_ExFxD, axes):
    """`local_ffn(x, experts, weights, up, down) -> y` (the one-device dropless dispatch) run
    per device as described above. `axes` from `sharded_dispatch_axes`."""
    batch, ex, tp = axes
    tokens = P(batch or None, None)
    ex_spec, tp_spec = ex or None, tp or None
    up_spec = P(ex_spec, None, tp_spec)
    if tp and up_ExDxF.shape[-1] == 2 * down_ExFxD.shape[1]:  # gated: up holds [gate | up]
        # split gate and up alike over `tensor` (a device gets matching halves of both)
        up_ExDxF = up_ExDxF.reshape(*up_ExDxF.shape[:-1], 2, -1)
        up_spec = P(ex_spec, None, None, tp_spec)

    def per_device(x, experts, weights, up, down):
        if up.ndim == 4:
            up = up.reshape(*up.shape[:2], -1)  # [gate_l | up_l]: what the activation splits
        if ex:
            x, experts, weights = (
                jax.lax.all_gather(a, ex, axis=0, tiled=True) for a in (x, experts, weights)
            )
            e_local = up.shape[0]
            first = jax.lax.axis_index(ex) * e_local
            local = experts - first
            mine = (local >= 0) & (local < e_local)
            experts = jnp.where(mine, local, e_local)  # others: a dummy group of zero weights
            weights = jnp.where(mine, weights, 0.0)
            up = jnp.concatenate([up, jnp.zeros_like(up[:1])])
            down = jnp.concatenate([down, jnp.zeros_like(down[:1])])
        y = local_ffn(x, experts, weights, up, down)
        if tp:
            y = jax.lax.psum(y, tp)
        if ex:
            y = jax.lax.psum_scatter(y, ex, scatter_dimension=0, tiled=True)
        return y

    return jax.shard_map(
        per_device,
        in_specs=(tokens, tokens, tokens, up_spec, P(ex_spec, tp_spec, None)),
        out_specs=tokens,
    )(x_TxD, experts_TxK, weights_TxK, up_ExDxF, down_ExFxD)
