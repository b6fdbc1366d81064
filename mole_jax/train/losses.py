"""Training objective: token cross-entropy in float32 plus the FFN layers' weighted aux losses.

The cross-entropy can run over chunks of the sequence (`train.loss_chunk`): each chunk's float32
logits are computed, reduced to a loss and dropped (recomputed in the backward pass), so the
[B, L, V] logits of the whole batch never exist at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits_BxLxV, targets_BxL):
    """Mean next-token cross-entropy, float32."""
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV.astype(jnp.float32), targets_BxL
    )
    return ce_BxL.mean()


def chunked_cross_entropy(logits_fn, h_BxLxD, targets_BxL, chunk: int):
    """`cross_entropy(logits_fn(h), targets)` computed `chunk` positions at a time (0 or >= L:
    at once). logits_fn: [B, c, D] -> float32 [B, c, V]."""
    b, n, d = h_BxLxD.shape
    if not chunk or chunk >= n:
        return cross_entropy(logits_fn(h_BxLxD), targets_BxL)
    pieces = n // chunk
    h_NxBxCxD = h_BxLxD.reshape(b, pieces, chunk, d).swapaxes(0, 1)
    t_NxBxC = targets_BxL.reshape(b, pieces, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def piece_sum(h_BxCxD, t_BxC):
        logits = logits_fn(h_BxCxD).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, t_BxC).sum()

    def body(total, xs):
        return total + piece_sum(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_NxBxCxD, t_NxBxC))
    return total / (b * n)


def objective(model, out, targets_BxL, chunk: int = 0):
    """(loss to differentiate, {scalar metrics}). `out`: a model.Output of `model` run with
    head=False (its final hidden state)."""
    ce = chunked_cross_entropy(model.logits, out.hidden_BxLxD, targets_BxL, chunk)
    aux_loss = out.aux["aux_loss"]
    return ce + aux_loss, {"ce": ce, "aux_loss": aux_loss}
