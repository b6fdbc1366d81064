"""What a training run and the training benchmark share: the state, the jitted step functions and
the placement of batches, built by one function (`setup`).

The hot loop jits pure functions over `nnx.split` state: the train state is a pytree
{'step', 'params', 'opt_state', 'rest'} of plain dicts (`rest` holds non-parameter model state such
as BatchNorm statistics). The train step is jitted with the state donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mole_jax.config import validate
from mole_jax.dedup import dedup_ids, host_dedup
from mole_jax.losses import cross_entropy, objective
from mole_jax.model import build_model
from mole_jax.model_config import model_config
from mole_jax.optim import make_optimizer, schedule


def init_state(cfg, tx):
    """(graphdef, state, table_layers) for a fresh model of `cfg.model` seeded with `cfg.seed`."""
    model = build_model(model_config(cfg), seed=cfg.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "rest": rest,
    }
    return graphdef, state, model.table_layers


def _tree_add(a, b):
    return jax.tree.map(lambda x, y: x + y.astype(x.dtype), a, b)


def _accumulate(grad_fn, params, rest, tables, xs):
    """Sums `grad_fn`'s gradients (w.r.t. params and tables) over the micro-batches
    xs = (inputs_MxBxL, targets_MxBxL, inv_MxBxL) with lax.scan, threading the non-param state.
    Returns ((g_params, g_tables, rest), (metrics, per_layer)) with per-micro-batch metrics."""

    def micro(carry, x):
        g_params, g_tables, rest = carry
        inp, tgt, inv_m = x
        (gp, gt), (mets, per_layer, rest) = grad_fn(params, rest, tables, inv_m, inp, tgt)
        return (_tree_add(g_params, gp), _tree_add(g_tables, gt), rest), (mets, per_layer)

    zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), t)
    return jax.lax.scan(micro, (zeros(params), zeros(tables), rest), xs)


def make_train_step(graphdef, tx, cfg, has_tables: bool) -> Callable:
    """train_step(state, batch_MxBxL1, dedup=None) -> (state, metrics), M = train.microbatches.

    Token tables (MoLE's per-token expert outputs) are computed once for the whole step's distinct
    ids; each micro-batch returns the gradient w.r.t. the tables, the sum is pulled back through
    the experts once with the table function's VJP. Exactly the gradient of the per-position form.
    `dedup` = (uniq_U, inv_MxBxL) from `dedup.host_dedup` of the step's inputs; without it the
    ids are deduplicated inside the step with the static bound min(V, M*B*L).
    """
    n_micro, vocab = cfg.train.microbatches, cfg.model.vocab_size
    lr_at = schedule(cfg)

    def forward_loss(params, rest, tables, inv, inputs, targets):
        model = nnx.merge(graphdef, params, rest)
        out = model(inputs, tables=tables, inv_BxL=inv, train=True)
        loss, mets = objective(out, targets)
        new_rest = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
        return loss, (dict(mets, loss=loss), out.aux["per_layer"], new_rest)

    grad_fn = jax.grad(forward_loss, argnums=(0, 2), has_aux=True)

    def train_step(state, batch, dedup=None):
        params = state["params"]
        inputs, targets = batch[..., :-1], batch[..., 1:]
        tables = inv = pull_tables = None
        if has_tables:
            uniq_U, inv = dedup_ids(inputs, vocab) if dedup is None else dedup

            def tables_fn(p):
                return nnx.merge(graphdef, p, state["rest"]).token_tables(uniq_U)

            tables, pull_tables = jax.vjp(tables_fn, params)

        xs = (inputs, targets, inv)
        (g_params, g_tables, rest), (mets, per_layer) = _accumulate(
            grad_fn, params, state["rest"], tables, xs
        )
        grads = jax.tree.map(lambda g: g / n_micro, g_params)
        if has_tables:
            g_tables = jax.tree.map(lambda g, t: (g / n_micro).astype(t.dtype), g_tables, tables)
            grads = _tree_add(grads, pull_tables(g_tables)[0])
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {
            "step": state["step"] + 1,
            "params": optax.apply_updates(params, updates),
            "opt_state": opt_state,
            "rest": rest,
        }
        metrics = jax.tree.map(lambda x: x.mean(0), {**mets, "per_layer": per_layer})
        metrics.update(
            grad_norm=optax.tree.norm(grads),
            param_norm=optax.tree.norm(new_state["params"]),  # of the updated weights
            lr=lr_at(state["step"]),
        )
        return new_state, metrics

    return train_step


def make_eval_step(graphdef) -> Callable:
    """eval_step(params, rest, batch_BxL1) -> mean cross-entropy of the batch (float32)."""

    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        out = model(batch[:, :-1], train=False)
        return cross_entropy(out.logits_BxLxV, batch[:, 1:])

    return eval_step


@dataclasses.dataclass
class Trainer:
    """A config's model, optimiser and jitted steps on a device mesh."""

    cfg: Any
    graphdef: Any
    tx: optax.GradientTransformation
    mesh: Mesh
    table_layers: tuple[int, ...]
    fresh_state: dict  # the initial train state, placed on the mesh
    step_fn: Callable  # jitted, state donated: (state, batch, dedup) -> (state, metrics)
    eval_fn: Callable  # jitted: (params, rest, batch) -> mean cross-entropy

    def place_state(self, state: dict) -> dict:
        return jax.device_put(state, NamedSharding(self.mesh, P()))

    def put_batch(self, batch: np.ndarray):
        """batch int32[B, L+1] -> the train step's device arguments (batch, dedup), split on
        'data'. For models with token tables the distinct ids are found here on the host, so
        the tables are only as large as the step's vocabulary (`dedup.host_dedup`)."""
        t = self.cfg.train
        shape = (t.microbatches, t.batch_size // t.microbatches, self.cfg.data.seq_len + 1)
        split = NamedSharding(self.mesh, P(None, "data"))
        batch = batch.reshape(shape)
        dedup = None
        if self.table_layers:
            uniq_U, inv = host_dedup(batch[..., :-1], self.cfg.model.vocab_size)
            replicated = NamedSharding(self.mesh, P())
            dedup = (jax.device_put(uniq_U, replicated), jax.device_put(inv, split))
        return jax.device_put(batch, split), dedup

    def put_eval(self, batch: np.ndarray):
        return jax.device_put(batch, NamedSharding(self.mesh, P("data")))


def data_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def setup(cfg) -> Trainer:
    """Validates `cfg` and builds its model, optimiser, initial state and jitted steps."""
    validate(cfg)
    tx = make_optimizer(cfg)
    graphdef, state, table_layers = init_state(cfg, tx)
    mesh = data_mesh()
    step_fn = jax.jit(make_train_step(graphdef, tx, cfg, bool(table_layers)), donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(graphdef))
    trainer = Trainer(cfg, graphdef, tx, mesh, table_layers, state, step_fn, eval_fn)
    trainer.fresh_state = trainer.place_state(state)
    return trainer
