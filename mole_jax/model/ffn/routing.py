"""Router math in float32 and the auxiliary losses, as pure functions.

Axis legend: T tokens (flattened batch), E experts, K selected experts per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ROUTER_MODES = ("topk_softmax", "softmax_topk")


def top_k_gates(logits_TxE, k: int, mode: str = "topk_softmax"):
    """(weights <float32>[T, K], experts <int32>[T, K], probs <float32>[T, E]).

    topk_softmax (MoLE paper's MoE baseline): softmax over the k selected logits.
    softmax_topk (Switch/GShard): softmax over all E, keep the k largest probabilities as they are.
    `probs` is always the softmax over all experts (what the load-balance loss uses).
    """
    logits = logits_TxE.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_logits, experts = jax.lax.top_k(logits, k)
    if mode == "topk_softmax":
        weights = jax.nn.softmax(top_logits, axis=-1)
    elif mode == "softmax_topk":
        weights = jnp.take_along_axis(probs, experts, axis=-1)
    else:
        raise ValueError(f"router mode {mode!r} not in {ROUTER_MODES}")
    return weights, experts.astype(jnp.int32), probs


def expert_load(experts_TxK, n_experts: int):
    """<float32>[E]: share of the T*K assignments that went to each expert (sums to 1)."""
    counts = jnp.zeros((n_experts,), jnp.float32).at[experts_TxK.ravel()].add(1.0)
    return counts / experts_TxK.size


def load_balance_loss(probs_TxE, experts_TxK):
    """Switch Transformer's loss E * sum_e f_e * P_e; 1.0 when routing is perfectly uniform.

    f_e: share of assignments to e (non-differentiable); P_e: mean router probability of e.
    """
    n_experts = probs_TxE.shape[-1]
    f_E = expert_load(experts_TxK, n_experts)
    p_E = probs_TxE.mean(axis=0)
    return n_experts * jnp.sum(f_E * p_E)


def z_loss(logits_TxE):
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)^2."""
    return jnp.mean(jax.nn.logsumexp(logits_TxE.astype(jnp.float32), axis=-1) ** 2)
