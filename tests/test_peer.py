"""PEER: product-key top-k equals brute force, the gathered layer equals a dense computation over
all experts, BatchNorm uses batch statistics in training and running statistics in eval."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import peer as peer_cfg
from mole_jax.model.config import model_config
from mole_jax.model.ffn import peer
from mole_jax.model.ffn.base import Ctx
from mole_jax.model.layers import ACTIVATIONS


def brute_force_topk(q_TxHxDk, keys1, keys2, k):
    """Scores of all N = n^2 experts, then top-k."""
    t, h, dk = q_TxHxDk.shape
    c, n = dk // 2, keys1.shape[1]
    keys1, keys2 = jnp.broadcast_to(keys1, (h, n, c)), jnp.broadcast_to(keys2, (h, n, c))
    s1 = jnp.einsum("thc,hnc->thn", q_TxHxDk[..., :c], keys1)
    s2 = jnp.einsum("thc,hnc->thn", q_TxHxDk[..., c:], keys2)
    full_TxHxN = (s1[..., :, None] + s2[..., None, :]).reshape(t, h, n * n)
    return jax.lax.top_k(full_TxHxN, k)


@pytest.mark.parametrize("key_heads", [1, 4])
def test_product_key_topk_equals_brute_force(key_heads):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (50, 4, 16))
    keys1 = jax.random.normal(ks[1], (key_heads, 32, 8))
    keys2 = jax.random.normal(ks[2], (key_heads, 32, 8))
    scores, experts = peer.product_key_topk(q, keys1, keys2, k=6)
    ref_scores, ref_experts = brute_force_topk(q, keys1, keys2, k=6)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(experts, ref_experts)


def make_layer(**fields):
    cfg = peer_cfg.get_config("size=tiny,keys=12,heads=3,topk=4")
    cfg.model.ffn.peer.update(dict(d_key=16, **fields))
    layer = peer.Layer(model_config(cfg), 1, rngs=nnx.Rngs(params=0))
    for seed, name in enumerate(("u", "v", "keys1", "keys2")):  # O(1) weights: top-k without ties
        var = getattr(layer, name)
        var[...] = jax.random.normal(jax.random.key(100 + seed), var.shape)
    return layer


def dense_reference(layer, x_TxD, q_TxHxDk):
    """Every expert of every head evaluated, masked to each head's top-k, softmax-weighted."""
    scores, experts = brute_force_topk(q_TxHxDk, layer.keys1[...], layer.keys2[...], layer.k)
    w = jax.nn.softmax(scores, axis=-1)
    all_act_TxN = ACTIVATIONS["gelu"](x_TxD @ layer.u[...].T)
    y = jnp.zeros_like(x_TxD)
    n_experts = layer.u.shape[0]
    for h in range(q_TxHxDk.shape[1]):
        gate_TxN = (
            jnp.zeros((x_TxD.shape[0], n_experts))
            .at[jnp.arange(x_TxD.shape[0])[:, None], experts[:, h]]
            .add(w[:, h])
        )
        y = y + (gate_TxN * all_act_TxN) @ layer.v[...]
    return y


def test_layer_equals_dense_computation_over_all_experts():
    layer = make_layer(query_bn=False)
    x = jax.random.normal(jax.random.key(7), (2, 9, 64))
    y, aux = layer(x, Ctx(None, None, train=True))
    x_TxD = x.reshape(-1, 64)
    q = layer.query(x_TxD).reshape(-1, 3, 16)
    np.testing.assert_allclose(
        y.reshape(-1, 64), dense_reference(layer, x_TxD, q), rtol=1e-4, atol=1e-5
    )
    assert 0 < float(aux["usage"]) <= 1 and float(aux["unevenness"]) >= 0


def test_batchnorm_batch_stats_in_training_running_stats_in_eval():
    layer = make_layer(query_bn=True)
    x = jax.random.normal(jax.random.key(3), (4, 8, 64)) * 3 + 1
    mean0 = np.asarray(layer.bn.mean[...]).copy()
    y_train_full = layer(x, Ctx(None, None, train=True))[0]
    scale = float(jnp.abs(y_train_full).max())
    # Training: statistics of the batch; a token's output depends on the rest of the batch ...
    y_train_half = layer(x[:2], Ctx(None, None, train=True))[0]
    assert float(jnp.abs(y_train_full[:2] - y_train_half).max()) > 1e-2 * scale
    # ... and the running statistics moved towards the batch's.
    assert not np.allclose(layer.bn.mean[...], mean0)
    # Eval: running statistics; a token's output is independent of the batch it is in.
    mean1 = np.asarray(layer.bn.mean[...]).copy()
    y_eval_full = layer(x, Ctx(None, None, train=False))[0]
    y_eval_half = layer(x[:2], Ctx(None, None, train=False))[0]
    # equal up to float32 rounding of differently shaped matmuls
    assert float(jnp.abs(y_eval_full[:2] - y_eval_half).max()) < 1e-6 * scale
    np.testing.assert_array_equal(layer.bn.mean[...], mean1)  # eval does not update them


def test_usage_and_unevenness_by_hand():
    experts = jnp.array([[[0, 1]], [[0, 1]]])  # 2 tokens, 1 head, k=2; 4 experts exist
    weights = jnp.array([[[0.5, 0.5]], [[0.5, 0.5]]])
    usage, kl = peer.usage_stats(experts, weights, 4)
    assert float(usage) == 0.5
    np.testing.assert_allclose(kl, np.log(2.0), rtol=1e-6)  # mass (1/2, 1/2, 0, 0) vs uniform
    usage, kl = peer.usage_stats(jnp.arange(4).reshape(1, 1, 4), jnp.full((1, 1, 4), 0.25), 4)
    assert float(usage) == 1.0 and abs(float(kl)) < 1e-6


@pytest.mark.slow  # allocates 2 x 2^20 x 64 expert weights
def test_million_expert_config_builds_and_runs_forward():
    cfg = peer_cfg.get_config("size=tiny,keys=1024,heads=8,topk=16")
    layer = peer.Layer(model_config(cfg), 1, rngs=nnx.Rngs(params=0))
    assert layer.u.shape == (1024 * 1024, 64)
    y, aux = layer(jnp.ones((1, 4, 64)), Ctx(None, None, train=False))
    assert y.shape == (1, 4, 64) and np.isfinite(np.asarray(y)).all()
