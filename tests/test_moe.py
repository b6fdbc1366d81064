"""MoE: each dispatch path vs a naive per-expert loop, aux losses by hand, 1 expert == dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import moe as moe_cfg
from mole_jax.errors import ConfigError, UserError
from mole_jax.infer.engine import require_causal
from mole_jax.model.config import model_config
from mole_jax.model.ffn import moe, routing
from mole_jax.model.ffn.base import Ctx
from mole_jax.model.layers import ACTIVATIONS, Mlp
from mole_jax.train.validate import validate

GELU = ACTIVATIONS["gelu"]


def naive_moe(x_TxD, router, up, down, k, mode):
    """Loop over experts: each expert runs on every token; keep the chosen ones."""
    weights, experts, _ = routing.top_k_gates(x_TxD @ router, k, mode)
    y = jnp.zeros_like(x_TxD)
    for e in range(up.shape[0]):
        y_e = GELU(x_TxD @ up[e]) @ down[e]
        gate = jnp.sum(jnp.where(experts == e, weights, 0.0), axis=-1)
        y = y + gate[:, None] * y_e
    return y


def make_layer(**fields):
    cfg = moe_cfg.get_config("size=tiny,experts=6,topk=2")
    cfg.model.ffn.moe.update(dict(d_expert=32, tile=8, **fields))
    layer = moe.Layer(model_config(cfg), 0, rngs=nnx.Rngs(params=0))
    # larger router weights than the 0.01 init, so routing is far from uniform
    layer.router[...] = jax.random.normal(jax.random.key(1), layer.router.shape)
    return layer


def run_layer(layer, x_BxLxD):
    """The layer's forward, compiled whole (faster here than op-by-op eager dispatch)."""
    graphdef, state = nnx.split(layer)
    ctx = Ctx(ids_BxL=None, emb_BxLxD=None)
    return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, ctx))(state, x_BxLxD)


X = jax.random.normal(jax.random.key(0), (3, 10, 64))


@pytest.mark.parametrize("grouped", ["blocked", "ragged"])
@pytest.mark.parametrize("mode", ["topk_softmax", "softmax_topk"])
def test_dropless_output_and_gradients_equal_naive_loop(grouped, mode):
    layer = make_layer(grouped=grouped, router_mode=mode)
    graphdef, params = nnx.split(layer)

    def loss_opt(p, x):
        return jnp.sum(run_layer(nnx.merge(graphdef, p), x)[0] ** 2)

    def loss_ref(p, x):
        return jnp.sum(
            naive_moe(x.reshape(-1, 64), p["router"][...], p["up"][...], p["down"][...], 2, mode)
            ** 2
        )

    y = run_layer(layer, X)[0].reshape(-1, 64)
    y_ref = naive_moe(X.reshape(-1, 64), layer.router[...], layer.up[...], layer.down[...], 2, mode)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    g_opt = jax.jit(jax.grad(loss_opt, argnums=(0, 1)))(params, X)
    g_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1)))(params, X)
    for a, b in zip(jax.tree.leaves(g_opt), jax.tree.leaves(g_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_capacity_path_equals_dropless_when_nothing_drops_and_drops_when_tight():
    roomy = make_layer(dispatch="capacity", capacity_factor=6.0)  # capacity >= all assignments
    y_cap, aux = run_layer(roomy, X)
    y_ref = naive_moe(
        X.reshape(-1, 64), roomy.router[...], roomy.up[...], roomy.down[...], 2, "topk_softmax"
    )
    np.testing.assert_allclose(y_cap.reshape(-1, 64), y_ref, rtol=1e-5, atol=1e-6)
    assert float(aux["dropped"]) == 0.0
    tight = make_layer(dispatch="capacity", capacity_factor=0.5)
    _, aux = run_layer(tight, X)
    assert 0.4 < float(aux["dropped"]) < 0.6  # half the slots for all assignments


def test_top_k_gates_modes_by_hand():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
    w, e, p = routing.top_k_gates(logits, 2, "topk_softmax")
    assert e.tolist() == [[0, 1]]
    np.testing.assert_allclose(w, [[np.e / (np.e + 1), 1 / (np.e + 1)]], rtol=1e-6)
    w2, _, _ = routing.top_k_gates(logits, 2, "softmax_topk")
    z = np.exp([2.0, 1.0, 0.0, -1.0]).sum()
    np.testing.assert_allclose(w2, [[np.exp(2) / z, np.exp(1) / z]], rtol=1e-6)
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-6)


def test_aux_losses_by_hand():
    probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    experts = jnp.array([[0], [1], [0], [2]])
    # f = (2/4, 1/4, 1/4); P = column means = (0.375, 0.3125, 0.3125); loss = 3 * sum f P
    expected = 3 * (0.5 * 0.375 + 0.25 * 0.3125 + 0.25 * 0.3125)
    np.testing.assert_allclose(routing.load_balance_loss(probs, experts), expected, rtol=1e-6)
    uniform = jnp.full((8, 4), 0.25)
    balanced = jnp.arange(8)[:, None] % 4
    np.testing.assert_allclose(routing.load_balance_loss(uniform, balanced), 1.0, rtol=1e-6)
    logits = jnp.array([[0.0, 0.0], [1.0, 3.0]])
    lse = np.array([np.log(2.0), np.log(np.e + np.e**3)])
    np.testing.assert_allclose(routing.z_loss(logits), np.mean(lse**2), rtol=1e-6)
    np.testing.assert_allclose(routing.expert_load(experts, 3), [0.5, 0.25, 0.25])


def test_layer_reports_weighted_aux_loss():
    layer = make_layer(lb_coef=0.5, z_coef=0.25)
    _, aux = run_layer(layer, X)
    np.testing.assert_allclose(aux["aux_loss"], 0.5 * aux["lb_loss"] + 0.25 * aux["z_loss"])
    np.testing.assert_allclose(aux["expert_load"].sum(), 1.0, rtol=1e-6)


def test_top1_moe_with_one_expert_equals_dense():
    cfg = moe_cfg.get_config("size=tiny,experts=1,topk=1")
    cfg.model.ffn.moe.d_expert = cfg.model.d_ff
    layer = moe.Layer(model_config(cfg), 0, rngs=nnx.Rngs(params=0))
    mlp = Mlp(64, cfg.model.d_ff, model_config(cfg), nnx.Rngs(params=3))
    layer.up[...] = mlp.up.kernel[...][None]
    layer.down[...] = mlp.down.kernel[...][None]
    y, aux = run_layer(layer, X)
    np.testing.assert_allclose(y, mlp(X), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux["lb_loss"], 1.0, rtol=1e-6)


@pytest.mark.parametrize("tokens", [1, 3])
def test_blocked_dispatch_with_few_tokens_equals_naive_loop(tokens):
    """Decoding routes a handful of tokens: the tile shrinks below `tile`, the result may not."""
    layer = make_layer(grouped="blocked")
    x = X[:1, :tokens]
    y = run_layer(layer, x)[0].reshape(-1, 64)
    y_ref = naive_moe(
        x.reshape(-1, 64), layer.router[...], layer.up[...], layer.down[...], 2, "topk_softmax"
    )
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)


def naive_expert_choice(x_BxLxD, router, up, down, k):
    """Per sequence and expert: sort the sequence's tokens by that expert's probability, keep
    the first C = ceil(L k / E), add prob * FFN_e(x) to each kept token."""
    b, n, _ = x_BxLxD.shape
    e = up.shape[0]
    cap = -(-n * k // e)
    probs = np.asarray(jax.nn.softmax(x_BxLxD @ router, axis=-1))
    y, chosen = np.zeros(x_BxLxD.shape), np.zeros((b, n), int)
    for s in range(b):
        for j in range(e):
            for t in np.argsort(-probs[s, :, j], kind="stable")[:cap]:
                y[s, t] += probs[s, t, j] * np.asarray(GELU(x_BxLxD[s, t] @ up[j]) @ down[j])
                chosen[s, t] += 1
    return y, chosen


def test_expert_choice_equals_naive_loop_and_is_balanced():
    layer = make_layer(routing="expert_choice", lb_coef=0.0)
    y, stats = run_layer(layer, X)
    y_ref, chosen = naive_expert_choice(X, layer.router[...], layer.up[...], layer.down[...], 2)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    logits = X.astype(jnp.float32) @ layer.router[...]
    _, chosen_impl = moe.expert_choice_ffn(X, logits, layer.up[...], layer.down[...], GELU, 2)
    np.testing.assert_array_equal(chosen_impl, chosen)
    assert np.asarray(chosen_impl).sum(axis=1).tolist() == [6 * 4] * 3  # C = ceil(10*2/6) = 4
    assert float(stats["unchosen"]) == pytest.approx(np.mean(chosen == 0))
    assert "lb_loss" not in stats and float(stats["aux_loss"]) > 0  # the z-loss only
    # identical router columns: every expert ranks the tokens alike and takes the same 4 of 10
    layer.router[...] = jnp.zeros_like(layer.router[...])
    assert float(run_layer(layer, X)[1]["unchosen"]) == pytest.approx(0.6)


def test_expert_choice_is_not_causal_and_says_so():
    layer = make_layer(routing="expert_choice", lb_coef=0.0)
    x2 = X.at[:, -1].add(5.0)  # change only the last position
    y1, y2 = run_layer(layer, X)[0], run_layer(layer, x2)[0]
    assert np.abs(np.asarray(y1 - y2)[:, :-1]).max() > 0  # earlier outputs moved
    cfg = moe_cfg.get_config("size=tiny,experts=6,topk=2,routing=expert_choice")
    assert not model_config(cfg).causal and model_config(moe_cfg.get_config()).causal
    with pytest.raises(UserError, match="^decoding .* needs a causal model; .*expert choice"):
        require_causal(model_config(cfg), "decoding with a KV cache")
    cfg.unlock()
    cfg.model.ffn.moe.lb_coef = 0.01
    with pytest.raises(ConfigError, match="balanced by construction"):
        validate(cfg)
