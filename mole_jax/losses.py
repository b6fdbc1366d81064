"""Training objective: token cross-entropy in float32 plus the FFN layers' weighted aux losses."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def cross_entropy(logits_BxLxV, targets_BxL):
    """Mean next-token cross-entropy, float32."""
    ce_BxL = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV.astype(jnp.float32), targets_BxL
    )
    return ce_BxL.mean()


def objective(out, targets_BxL):
    """(loss to differentiate, {scalar metrics}). `out` is a model.Output."""
    ce = cross_entropy(out.logits_BxLxV, targets_BxL)
    aux_loss = out.aux["aux_loss"]
    return ce + aux_loss, {"ce": ce, "aux_loss": aux_loss}
