"""init, train_step, eval_step and run(cfg, workdir): the pretraining loop.

The hot loop jits pure functions over `nnx.split` state: the train state is a pytree
{'step', 'params', 'opt_state', 'rest'} of plain dicts (`rest` holds non-parameter model state such
as BatchNorm statistics). The step is jitted with the state donated, its metrics are pulled to the
host one step late so dispatch stays asynchronous, and a non-finite loss stops the run before any
checkpoint of the diverged state is written.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mole_jax import accounting, data
from mole_jax.checkpoint import Checkpointer
from mole_jax.config import load_config, save_config, validate
from mole_jax.errors import ConfigError, TrainingDiverged
from mole_jax.files import write_text_atomic
from mole_jax.losses import cross_entropy, objective
from mole_jax.metrics import MetricsWriter, aux_stats, read_metrics
from mole_jax.model import build_model, dedup_ids, host_dedup
from mole_jax.optim import make_optimizer, schedule


def init_state(cfg, tx):
    """(graphdef, state, table_layers) for a fresh model of `cfg.model` seeded with `cfg.seed`."""
    model = build_model(cfg.model, cfg.seed)
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
    `dedup` = (uniq_U, inv_MxBxL) from `model.host_dedup` of the step's inputs; without it the
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


def evaluate_tokens(eval_fn, params, rest, tokens, cfg, shard) -> dict:
    """Validation loss and perplexity over `train.eval_batches` fixed windows of `tokens`."""
    t = cfg.train
    losses = [
        float(eval_fn(params, rest, shard(b)))
        for b in data.eval_batches(
            tokens, t.batch_size // t.microbatches, cfg.data.seq_len, t.eval_batches
        )
    ]
    loss = float(np.mean(losses))
    return {
        "val_loss": loss,
        "val_ppl": float(np.exp(loss)),
        "val_tokens": len(losses) * (t.batch_size // t.microbatches) * cfg.data.seq_len,
    }


def data_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()), ("data",))


def batch_putter(mesh: Mesh, cfg, has_tables: bool) -> Callable:
    """batch int32[B, L+1] -> the train step's device arguments (batch, dedup), sharded on 'data'.

    For models with token tables the distinct ids are found here on the host, so the tables are
    only as large as the step's vocabulary (`model.host_dedup`)."""
    t = cfg.train
    shape = (t.microbatches, t.batch_size // t.microbatches, cfg.data.seq_len + 1)
    split = NamedSharding(mesh, P(None, "data"))

    def put(batch: np.ndarray):
        batch = batch.reshape(shape)
        dedup = None
        if has_tables:
            uniq_U, inv = host_dedup(batch[..., :-1], cfg.model.vocab_size)
            dedup = (jax.device_put(uniq_U, NamedSharding(mesh, P())), jax.device_put(inv, split))
        return jax.device_put(batch, split), dedup

    return put


def _check_resume_compatible(cfg, workdir: str) -> None:
    """A workdir with checkpoints resumes only with the same model and data."""
    path = os.path.join(workdir, "config.json")
    ckpts = os.path.join(workdir, "checkpoints")
    if not os.path.exists(path) or not os.path.isdir(ckpts) or not os.listdir(ckpts):
        return
    old = load_config(workdir)
    for section, fields in (("model", None), ("data", ("corpus", "vocab_size", "seq_len"))):
        a, b = json.loads(old[section].to_json()), json.loads(cfg[section].to_json())
        for k in fields or sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                raise ConfigError(
                    f"{workdir} holds a run with {section}.{k}={a.get(k)!r}, not {b.get(k)!r}; "
                    "use a new --workdir or the original config"
                )


class _Progress:
    def __init__(self, cfg, start: int):
        from tqdm import tqdm

        on = cfg.train.progress and sys.stderr.isatty()
        self.bar = tqdm(total=cfg.train.steps, initial=start, disable=not on, unit="step")

    def update(self, row: dict) -> None:
        self.bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run(cfg, workdir: str, hooks: tuple[Callable[[int, dict], None], ...] = ()) -> dict:
    """Trains `cfg` in `workdir`, resuming from its newest good checkpoint. Returns a summary.

    `hooks` are called as hook(step, metrics_row) after each logged step (tests use one to stop
    a run as a crash would).
    """
    validate(cfg)
    _check_resume_compatible(cfg, workdir)
    td = data.prepare(cfg)  # before writing anything: a missing corpus leaves the workdir as it was
    os.makedirs(workdir, exist_ok=True)
    save_config(cfg, os.path.join(workdir, "config.json"))
    tok_path = os.path.join(workdir, "tokenizer.json")  # eval/generate read the run's tokenizer
    write_text_atomic(tok_path, td.tokenizer.to_str())
    summary = accounting.summarize(cfg)
    write_text_atomic(os.path.join(workdir, "model_summary.json"), json.dumps(summary, indent=2))

    tx = make_optimizer(cfg)
    graphdef, state, table_layers = init_state(cfg, tx)
    ckpt = Checkpointer(workdir, cfg.train.keep_ckpts, cfg.train.async_ckpt)
    restored = ckpt.restore(state)
    if restored is not None:
        state = restored[0]
    start = int(state["step"])
    mesh = data_mesh()
    state = jax.device_put(state, NamedSharding(mesh, P()))
    shard_micro = batch_putter(mesh, cfg, bool(table_layers))
    shard_eval = lambda b: jax.device_put(b, NamedSharding(mesh, P("data")))
    step_fn = jax.jit(make_train_step(graphdef, tx, cfg, bool(table_layers)), donate_argnums=0)
    eval_fn = jax.jit(make_eval_step(graphdef))
    try:
        result = _loop(
            cfg,
            workdir,
            td,
            state,
            step_fn,
            eval_fn,
            ckpt,
            (shard_micro, shard_eval),
            start,
            summary,
            hooks,
        )
    finally:
        ckpt.close()
    return _recorded(result, workdir) if start == cfg.train.steps else result


def _recorded(result: dict, workdir: str) -> dict:
    """A run that was already complete trains nothing: report its last recorded metrics."""
    for row in read_metrics(workdir):
        result.update({k: row[k] for k in ("loss", "val_loss", "tokens_per_s") if k in row})
    return result


def _loop(cfg, workdir, td, state, step_fn, eval_fn, ckpt, shards, start, summary, hooks):
    t = cfg.train
    shard_micro, shard_eval = shards
    writer = MetricsWriter(workdir, start)
    progress = _Progress(cfg, start)
    tokens_per_step = t.batch_size * cfg.data.seq_len
    last = {"step": start}
    pending, t_ref = None, time.perf_counter()

    def flush():
        nonlocal pending, t_ref
        if pending is None:
            return
        step, mets = pending
        pending = None
        mets = jax.device_get(mets)
        now = time.perf_counter()
        dt, t_ref = now - t_ref, now
        row = {k: float(v) for k, v in mets.items() if k != "per_layer"}
        row.update(aux_stats(mets["per_layer"]))
        row.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt)
        bad = next((k for k in ("loss", "param_norm") if not np.isfinite(row[k])), None)
        if bad:
            good = (ckpt.steps() or ["none"])[-1]
            raise TrainingDiverged(
                f"{bad} is {row[bad]} at step {step}: stopped; the last good checkpoint ({good}) "
                "is kept; lower train.lr or raise train.warmup_frac"
            )
        if step % t.log_every == 0 or step == t.steps:
            writer.write(step, row)
        last.update(row, step=step)
        progress.update(row)
        for hook in hooks:
            hook(step, row)

    try:
        for s in range(start, t.steps):
            batch = data.train_batch(td.train, cfg.seed, s, t.batch_size, cfg.data.seq_len)
            state, mets = step_fn(state, *shard_micro(batch))
            flush()
            pending = (s + 1, mets)
            done = s + 1 == t.steps
            if (t.eval_every and (s + 1) % t.eval_every == 0) or done:
                flush()
                ev = evaluate_tokens(
                    eval_fn, state["params"], state["rest"], td.val, cfg, shard_eval
                )
                writer.write(s + 1, ev)
                last.update(ev)
                t_ref = time.perf_counter()
            if (t.ckpt_every and (s + 1) % t.ckpt_every == 0) or done:
                flush()  # never checkpoint a state whose loss was not seen to be finite
                ckpt.save(state)
                t_ref = time.perf_counter()
        flush()
    finally:
        writer.close()
        progress.close()
    return {
        "workdir": workdir,
        "step": last["step"],
        "loss": last.get("loss"),
        "val_loss": last.get("val_loss"),
        "tokens_per_s": last.get("tokens_per_s"),
        "params_total": summary["params_total"],
    }
