"""AdamW with linear warmup, cosine decay to a floor, global-norm clipping, no decay on norms."""

from __future__ import annotations

import jax
import optax

from mole_jax.config import warmup_steps


def schedule(cfg) -> optax.Schedule:
    t = cfg.train
    warm = warmup_steps(cfg)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warm else t.lr,
        peak_value=t.lr,
        warmup_steps=warm,
        decay_steps=max(t.steps, warm + 1),
        end_value=t.lr * t.min_lr_ratio,
    )


def decay_mask(params):
    """True for matrices (projections, embeddings, expert tables); False for norms and biases."""

    def keep(path, leaf):
        names = {str(getattr(k, "key", getattr(k, "idx", k))) for k in path}
        return leaf.ndim >= 2 and not any("norm" in n or n in ("scale", "bias") for n in names)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
    t = cfg.train
    return optax.chain(
        optax.clip_by_global_norm(t.clip),
        optax.adamw(
            schedule(cfg), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=decay_mask
        ),
    )
