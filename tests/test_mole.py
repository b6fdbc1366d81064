"""MoLE: the unique-token path equals the per-position path in output and gradient (also with
host-side dedup and gradient accumulation); the whole-vocabulary table reproduces the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import mole as mole_cfg
from mole_jax.data.dedup import (
    check_ids,
    dedup_bucket,
    dedup_ids,
    host_dedup,
    host_dedup_groups,
    unique_inverse,
)
from mole_jax.errors import DataError
from mole_jax.model.backbone import build_model
from mole_jax.model.config import model_config
from mole_jax.train.optim import make_optimizer
from mole_jax.train.trainer import init_state, make_train_step

V = 256


def config(impl="unique", experts=4, **mole):
    cfg = mole_cfg.get_config(f"size=tiny,experts={experts}")
    cfg.model.vocab_size = V
    cfg.data.vocab_size = V
    cfg.model.ffn.mole.update(dict(impl=impl, **mole))
    return cfg


IDS = jnp.asarray(np.random.default_rng(0).integers(0, 40, (4, 16)), jnp.int32)  # many repeats


def loss_and_grads(cfg):
    model = build_model(model_config(cfg), seed=4)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        out = nnx.merge(graphdef, p, rest)(IDS, train=True)
        return jnp.mean(out.logits_BxLxV**2), out.logits_BxLxV

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, nnx.to_pure_dict(grads), model


def test_unique_path_equals_per_position_in_output_and_gradient():
    logits_u, g_u, m_u = loss_and_grads(config("unique"))
    logits_p, g_p, m_p = loss_and_grads(config("per_position"))
    assert m_u.table_layers == (0, 1) and m_p.table_layers == ()
    np.testing.assert_allclose(logits_u, logits_p, rtol=1e-5, atol=1e-6)
    flat_u, flat_p = jax.tree.leaves_with_path(g_u), jax.tree.leaves_with_path(g_p)
    assert [p for p, _ in flat_u] == [p for p, _ in flat_p]
    for (path, a), (_, b) in zip(flat_u, flat_p, strict=True):
        scale = float(jnp.abs(b).max()) + 1e-12
        assert float(jnp.abs(a - b).max()) <= 1e-5 * scale, jax.tree_util.keystr(path)
    # The experts got gradient through the tables.
    assert float(jnp.abs(g_u["blocks"][0]["ffn"]["up"]).max()) > 0


@pytest.mark.parametrize(
    "micro,scope,groups", [(1, "step", 1), (2, "step", 1), (2, "microbatch", 1), (2, "step", 2)]
)
def test_train_step_with_host_dedup_and_accumulation_equals_per_position(micro, scope, groups):
    """Tables once per step or per micro-batch, one for the whole batch or one per group of its
    rows (per device on a mesh): the step of the per-position form either way."""
    batch = np.random.default_rng(1).integers(0, 60, (8, 17)).astype(np.int32)
    results = {}
    for impl in ("unique", "per_position"):
        cfg = config(impl)
        cfg.train.update(dict(batch_size=8, microbatches=micro if impl == "unique" else 1))
        cfg.train.token_tables = scope
        tx = make_optimizer(cfg)
        graphdef, state, tables = init_state(cfg, tx)
        b = batch.reshape(cfg.train.microbatches, -1, 17)
        per_micro = scope == "microbatch"
        dedup = host_dedup_groups(b[..., :-1], V, groups, per_micro) if tables else None
        step = jax.jit(make_train_step(graphdef, tx, cfg, bool(tables)))
        state, m = step(state, b, dedup)
        results[impl] = (state["params"], float(m["loss"]), float(m["grad_norm"]))
    (pu, lu, gu), (pp, lp, gp) = results["unique"], results["per_position"]
    assert lu == pytest.approx(lp, rel=1e-5) and gu == pytest.approx(gp, rel=1e-4)
    for a, b in zip(jax.tree.leaves(pu), jax.tree.leaves(pp), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_whole_vocab_table_reproduces_the_forward():
    cfg = config()
    graphdef, state = nnx.split(build_model(model_config(cfg), seed=5))

    @jax.jit
    def both(state):
        model = nnx.merge(graphdef, state)
        tables = model.token_tables(jnp.arange(V))
        via_lut = model(IDS, tables=tables, inv_BxL=IDS).logits_BxLxV
        return tables, via_lut, model(IDS).logits_BxLxV

    tables, via_lut, direct = both(state)
    assert tables[0].shape == (V, 4, 64)
    np.testing.assert_allclose(via_lut, direct, rtol=1e-5, atol=1e-6)


def test_router_probabilities_sum_to_one_and_aux_losses_optional():
    model = build_model(model_config(config()), seed=6)
    out = model(IDS)
    for aux in out.aux["per_layer"].values():
        np.testing.assert_allclose(aux["expert_load"].sum(), 1.0, rtol=1e-6)
        assert "lb_loss" not in aux  # the paper trains MoLE with cross-entropy only
    assert float(out.aux["aux_loss"]) == 0.0
    out = build_model(model_config(config(lb_coef=0.1, z_coef=0.01)), seed=6)(IDS)
    aux = out.aux["per_layer"][0]
    np.testing.assert_allclose(aux["aux_loss"], 0.1 * aux["lb_loss"] + 0.01 * aux["z_loss"])


def test_hidden_input_ablation_has_no_token_table():
    model = build_model(model_config(config(expert_input="hidden")), seed=7)
    assert model.table_layers == () and model.blocks[0].ffn.norm_exp is None
    assert np.isfinite(np.asarray(model(IDS).logits_BxLxV)).all()


def test_dedup_helpers():
    ids = np.array([[5, 3, 5], [9, 3, 3]])
    uniq, inv = host_dedup(ids, 100)
    np.testing.assert_array_equal(uniq[inv], ids)
    assert len(uniq) == dedup_bucket(3, 100) == 3
    assert dedup_bucket(700, 8192) == 768 and dedup_bucket(9000, 8192) == 8192
    assert all(n <= dedup_bucket(n, 10**6) <= 1.25 * n for n in range(1, 5000))
    full = np.array([[0, 1, 2], [3, 3, 1]])  # every id of a 4-token vocabulary: table = vocab
    uniq, inv = host_dedup(full, 4)
    np.testing.assert_array_equal(uniq, np.arange(4))
    np.testing.assert_array_equal(inv, full)
    u2, inv2 = dedup_ids(jnp.asarray(ids), 100)
    np.testing.assert_array_equal(np.asarray(u2)[np.asarray(inv2)], ids)
    with pytest.raises(DataError, match="token id 9 is outside the vocabulary"):
        check_ids(ids, 9)


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 8), (4, 100)])  # dict path and numpy path
def test_unique_inverse_equals_numpy(shape):
    ids = np.random.default_rng(0).integers(0, 50, shape).astype(np.int32)
    uniq, inv = unique_inverse(ids)
    want_uniq, want_inv = np.unique(ids.ravel(), return_inverse=True)
    np.testing.assert_array_equal(uniq, want_uniq)
    np.testing.assert_array_equal(inv, want_inv)
    assert uniq.dtype == ids.dtype
