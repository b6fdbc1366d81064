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
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mole_jax.data.dedup import check_ids, dedup_ids, host_dedup_groups
from mole_jax.model.backbone import abstract_model, build_model
from mole_jax.model.config import model_config
from mole_jax.parallel.sharding import (
    batch_ways,
    follow_params,
    logical_spec,
    make_mesh,
    shardings,
    variable_specs,
)
from mole_jax.train.losses import chunked_cross_entropy, objective
from mole_jax.train.optim import make_optimizer, schedule
from mole_jax.train.validate import validate


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
    xs = (inputs_MxBxL, targets_MxBxL, inv_MxBxL, uniq_MxGxU) with lax.scan, threading the
    non-param state. Returns ((g_params, g_tables, rest), (metrics, per_layer)) with
    per-micro-batch metrics."""

    def micro(carry, x):
        g_params, g_tables, rest = carry
        inp, tgt, inv_m, uniq_m = x
        (gp, gt), (mets, per_layer, rest) = grad_fn(params, rest, tables, inv_m, uniq_m, inp, tgt)
        return (_tree_add(g_params, gp), _tree_add(g_tables, gt), rest), (mets, per_layer)

    zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), t)
    return jax.lax.scan(micro, (zeros(params), zeros(tables), rest), xs)


def make_train_step(graphdef, tx, cfg, has_tables: bool) -> Callable:
    """train_step(state, batch_MxBxL1, dedup=None) -> (state, metrics), M = train.microbatches.

    Token tables (MoLE's per-token expert outputs), with train.token_tables='step', are computed
    once for the whole step's distinct ids; each micro-batch returns the gradient w.r.t. the
    tables, the sum is pulled back through the experts once with the table function's VJP. With
    'microbatch', each micro-batch computes (and differentiates) the tables of its own ids, so a
    step's tables never outgrow one micro-batch. Either way exactly the gradient of the
    per-position form. `dedup` = (uniq, inv_MxBxL) from `dedup.host_dedup_groups`: one table per
    group of the batch's rows (per device on a mesh, so no device holds another's rows); uniq is
    [G, U] (or [U]) per step, [M, G, U] per micro-batch. Without it the ids are deduplicated
    inside the step with the static bound min(V, tokens). With model.remat, the experts' hidden
    states are recomputed in the pull-back instead of kept.
    """
    n_micro, vocab = cfg.train.microbatches, cfg.model.vocab_size
    per_step = has_tables and cfg.train.token_tables == "step"
    lr_at = schedule(cfg)
    table_fn, forward_loss = _loss_fns(graphdef, cfg)

    grad_fn = jax.grad(forward_loss, argnums=(0, 2), has_aux=True)

    def train_step(state, batch, dedup=None):
        params = state["params"]
        inputs, targets = batch[..., :-1], batch[..., 1:]
        tables = inv = uniq_m = pull_tables = None
        if per_step:
            uniq, inv = dedup_ids(inputs, vocab) if dedup is None else dedup
            tables, pull_tables = jax.vjp(
                table_fn(state["rest"], uniq.reshape(-1, uniq.shape[-1])), params
            )
        elif has_tables and dedup is not None:
            uniq_m, inv = dedup  # [M, G, U]: scanned with the micro-batches
        xs = (inputs, targets, inv, uniq_m)
        (g_params, g_tables, rest), (mets, per_layer) = _accumulate(
            grad_fn, params, state["rest"], tables, xs
        )
        grads = jax.tree.map(lambda g: g / n_micro, g_params)
        if per_step:
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


def _loss_fns(graphdef, cfg):
    """(table_fn, forward_loss) of `make_train_step`: table_fn(rest, uniq)(params) -> the token
    tables of the ids uniq [G, U]; forward_loss(params, rest, tables, inv, uniq, inputs, targets)
    -> (loss, (metrics, per-layer aux, new non-parameter state)), with the tables handed in, or
    built from this micro-batch's `uniq` (inside each layer's step when the layers are scanned).
    """
    m = model_config(cfg)  # (its defaults for fields older configs lack)
    scan = m.scan_layers

    def table_fn(rest, uniq):
        fn = lambda p: nnx.merge(graphdef, p, rest).token_tables(uniq)
        return jax.checkpoint(fn) if m.remat != "none" else fn

    def forward_loss(params, rest, tables, inv, uniq, inputs, targets):
        if uniq is not None:  # this micro-batch's own tables
            uniq = uniq.reshape(-1, uniq.shape[-1])
            if not scan:  # (scanned layers each build their own in their step)
                tables, uniq = table_fn(rest, uniq)(params), None
        model = nnx.merge(graphdef, params, rest)
        out = model(inputs, tables=tables, inv_BxL=inv, uniq=uniq, train=True, head=False)
        loss, mets = objective(model, out, targets, cfg.train.loss_chunk)
        new_rest = nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param)))
        return loss, (dict(mets, loss=loss), out.aux["per_layer"], new_rest)

    return table_fn, forward_loss


def make_eval_step(graphdef, chunk: int = 0) -> Callable:
    """eval_step(params, rest, batch_BxL1) -> mean cross-entropy of the batch (float32)."""

    def eval_step(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        out = model(batch[:, :-1], train=False, head=False)
        return chunked_cross_entropy(model.logits, out.hidden_BxLxD, batch[:, 1:], chunk)

    return eval_step


@dataclasses.dataclass
class Trainer:
    """A config's model, optimiser and jitted steps on a device mesh. The train state is created
    sharded (`init_state`: `jax.jit` of the initialiser with the state's shardings as
    out_shardings), never whole on one device; `abstract_state` carries the same shardings for
    restoring a checkpoint into place."""

    cfg: Any
    model_config: Any
    graphdef: Any
    tx: optax.GradientTransformation
    mesh: Mesh
    table_layers: tuple[int, ...]
    abstract_state: dict  # ShapeDtypeStructs with their NamedShardings
    init_state: Callable  # () -> the initial train state, sharded
    step_fn: Callable  # jitted, state donated: (state, batch, dedup) -> (state, metrics)
    eval_fn: Callable  # jitted: (params, rest, batch) -> mean cross-entropy

    def init_optimizer(self, params):
        """A fresh optimiser state for `params`, made in place on its shardings (a checkpoint
        saved without one: `launch.py import`'s)."""
        shard = jax.tree.map(lambda a: a.sharding, self.abstract_state["opt_state"])
        return _on_mesh(self.mesh, jax.jit(self.tx.init, out_shardings=shard))(params)

    @property
    def batch_sharding(self) -> NamedSharding:
        """[M, B, L+1] batches: B split over the batch axes of the mesh."""
        return NamedSharding(self.mesh, logical_spec((None, "batch", None), self.mesh))

    def process_rows(self, batch_size: int, micro: bool = True) -> np.ndarray:
        """The rows of a global batch of `batch_size` this process reads (all of them in a
        single-process run)."""
        t = self.cfg.train
        m = t.microbatches if micro else 1
        shape = (m, batch_size // m, self.cfg.data.seq_len + 1)
        spans = {
            idx[1].indices(shape[1])[:2]
            for idx in self.batch_sharding.addressable_devices_indices_map(shape).values()
        }
        local = np.unique(np.concatenate([np.arange(a, b) for a, b in spans]))
        return (np.arange(m)[:, None] * shape[1] + local[None, :]).ravel()

    def put_batch(self, local: np.ndarray):
        """This process's rows of the step's batch (`process_rows`), int32[B_local, L+1] -> the
        train step's device arguments (batch, dedup). For models with token tables the distinct
        ids of the whole step are found on the host (`dedup.host_dedup`; across processes,
        their union), so the tables are only as large as the step's vocabulary."""
        t = self.cfg.train
        m = t.microbatches
        check_ids(local, self.cfg.model.vocab_size)  # jnp.take would clamp a bad id silently
        local = local.reshape(m, -1, local.shape[-1])
        global_shape = (m, t.batch_size // m, local.shape[-1])
        batch = jax.make_array_from_process_local_data(self.batch_sharding, local, global_shape)
        dedup = None
        if self.table_layers:
            groups, per_micro = self.local_groups, t.token_tables == "microbatch"
            vocab = self.cfg.model.vocab_size
            uniq, inv = host_dedup_groups(local[..., :-1], vocab, groups, per_micro)
            uniq = _agree_on_table_size(uniq)
            shape = uniq.shape[:-2] + (groups * jax.process_count(), uniq.shape[-1])
            names = ((None,) if per_micro else ()) + ("batch", None)
            sharding = NamedSharding(self.mesh, logical_spec(names, self.mesh))
            uniq = jax.make_array_from_process_local_data(sharding, uniq, shape)
            inv = jax.make_array_from_process_local_data(
                self.batch_sharding, inv, global_shape[:2] + (global_shape[2] - 1,)
            )
            dedup = (uniq, inv)
        return batch, dedup

    @property
    def group_sharding(self) -> NamedSharding:
        """[G, U] token-table ids: one group per way the batch is split."""
        return NamedSharding(self.mesh, logical_spec(("batch", None), self.mesh))

    @property
    def local_groups(self) -> int:
        """Token-table groups whose rows this process holds (the batch split's ways, over the
        processes)."""
        return batch_ways(dict(self.mesh.shape)) // jax.process_count()

    def put_eval(self, local: np.ndarray, batch_size: int):
        """This process's rows of an eval batch -> a [B, L+1] array split over the batch axes."""
        sharding = NamedSharding(self.mesh, logical_spec(("batch", None), self.mesh))
        return jax.make_array_from_process_local_data(
            sharding, local, (batch_size, local.shape[-1])
        )


def _agree_on_table_size(uniq: np.ndarray) -> np.ndarray:
    """Pads this process's tables ([..., U]) to the largest table size of any process (the
    arrays of a multi-process step have one shape); unchanged in a single process."""
    if jax.process_count() == 1:
        return uniq
    from jax.experimental import multihost_utils

    size = int(np.max(multihost_utils.process_allgather(np.int32(uniq.shape[-1]))))
    out = np.zeros(uniq.shape[:-1] + (size,), np.int32)
    out[..., : uniq.shape[-1]] = uniq
    return out


def state_specs(abstract_state: dict, mesh: Mesh, param_specs: dict, rest_specs: dict) -> dict:
    return {
        "step": PartitionSpec(),
        "params": param_specs,
        "opt_state": follow_params(abstract_state["opt_state"], param_specs),
        "rest": rest_specs,
    }


def setup(cfg, mesh: Mesh | None = None) -> Trainer:
    """Validates `cfg` and builds its mesh (or takes `mesh`: a compile target's, say, whose
    devices are not this host's), model, optimiser, state layout and jitted steps."""
    mcfg = validate(cfg, n_devices=None if mesh is None else mesh.size)
    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    tx = make_optimizer(cfg)
    abstract_net = abstract_model(mcfg)
    graphdef, a_params, a_rest = nnx.split(abstract_net, nnx.Param, ...)
    table_layers = abstract_net.table_layers

    def init():
        _, params, rest = nnx.split(build_model(mcfg, seed=cfg.seed), nnx.Param, ...)
        params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
        opt_state = tx.init(params)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state,
                "rest": rest}  # fmt: skip

    abstract = jax.eval_shape(init)
    specs = state_specs(
        abstract, mesh, variable_specs(a_params, mesh), variable_specs(a_rest, mesh)
    )
    state_sh = shardings(specs, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.jit(
        make_train_step(graphdef, tx, cfg, bool(table_layers)),
        out_shardings=(state_sh, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(make_eval_step(graphdef, cfg.train.loss_chunk), out_shardings=replicated)
    return Trainer(
        cfg=cfg,
        model_config=mcfg,
        graphdef=graphdef,
        tx=tx,
        mesh=mesh,
        table_layers=table_layers,
        abstract_state=abstract,
        init_state=_on_mesh(mesh, jax.jit(init, out_shardings=state_sh)),
        step_fn=_on_mesh(mesh, step),
        eval_fn=_on_mesh(mesh, eval_step),
    )


def _on_mesh(mesh: Mesh, fn: Callable) -> Callable:
    """`fn` traced and run with `mesh` set, so that the model's logical constraints apply."""

    def run(*args):
        with jax.set_mesh(mesh):
            return fn(*args)

    run.lower = lambda *args: _lower(mesh, fn, *args)
    return run


def _lower(mesh, fn, *args):
    with jax.set_mesh(mesh):
        return fn.lower(*args)
