"""Read-ME's conversion of a trained dense model into a pre-gated MoE (`launch.py convert`).

Axis legend: B batch, L length, D model, F dense FFN width, N experts (= domains), T = B*L.

1. Calibration: `convert.calib_windows` windows of each corpus run through the dense model; a
   channel's importance for a corpus is the mean of |W1 x| over its tokens, per layer (Read-ME
   Eq. 3: E ||M W1 x||_1). `convert.domains` names one domain per expert, separated by commas; a
   domain may join corpora with '+' (its importance is their mean): `a+b+c` with one expert is
   the dense model pruned to the active width by the same criterion, tuned on the same batches
   (Read-ME Table 5's baseline).
2. Channel selection, per layer: the permanent expert takes the `permanent` channels with the
   largest importance summed over the domains (channels every domain needs); expert i takes the
   `d_expert` channels of the rest most important to domain i. Slicing W1's columns and W2's rows
   gives the experts; everything else (embedding, attention, norms, head) is copied, and the
   router's embedding starts from the dense embedding's first R columns (Read-ME's code).
3. Alternating rounds (`convert.rounds`): router tuning (`router_steps`, only the router, the
   distillation loss KL(softmax(G) || softmax(overlap)) of Read-ME Eq. 4, where overlap_i counts
   the dense model's top-50 % active channels of the token, over all layers, that expert i holds)
   then expert tuning (`expert_steps`, everything but the router, the LM loss); AdamW with
   `weight_decay`, cosine decay within a round, both learning rates x `round_decay` per round.
   Batches cycle through the corpora (the same sequence for any grouping of the same corpora).
The result is an ordinary workdir at step 0 (config, the dense run's tokenizer, checkpoint):
eval, export --experts, generate, sweep and `train` (further training) read it. `convert.json`
records the selection's coverage and each round's first and last losses.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mole_jax.data import pipeline
from mole_jax.errors import UserError
from mole_jax.files import write_text_atomic
from mole_jax.model.backbone import build_model
from mole_jax.model.config import model_config
from mole_jax.model.layers import ACTIVATIONS
from mole_jax.train.checkpoint import Checkpointer, restore_model
from mole_jax.train.loop import run_digest, write_workdir
from mole_jax.train.losses import cross_entropy
from mole_jax.train.optim import decay_mask, make_optimizer
from mole_jax.train.validate import validate
from mole_jax.workdir import as_workdir

PARTIAL = "convert.partial"  # marks a conversion that was killed before convert.json
BACKBONE = ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "activation")


def convert(dense_dir, workdir, cfg) -> dict:
    """Writes the converted workdir; returns what `convert.json` records."""
    src, wd = as_workdir(dense_dir), as_workdir(workdir)
    cfg = _checked_config(src, cfg)
    _check_target(wd)
    md, m = model_config(src.config), model_config(cfg)
    dense = restore_model(src, md).params
    groups = [g.split("+") for g in str(cfg.convert.domains).split(",")]
    corpora = list(dict.fromkeys(c for g in groups for c in g))
    streams = [_domain_tokens(cfg, c) for c in corpora]
    per_corpus = _importance(dense, md, streams, cfg)  # [C, L, F]
    importance = np.stack([per_corpus[[corpora.index(c) for c in g]].mean(0) for g in groups])
    perm, experts = select_channels(importance, m.ffn.permanent, m.ffn.d_expert)
    model = build_model(m, seed=cfg.seed)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = converted_params(nnx.to_pure_dict(params), dense, perm, experts)
    log = _tune(graphdef, params, nnx.to_pure_dict(rest), dense, md, experts, streams, cfg)
    record = dict(
        source=str(src.path),
        domains=str(cfg.convert.domains).split(","),
        permanent_channels=int(perm.shape[-1]),
        expert_channels=int(experts.shape[-1]),
        channels_covered=[
            len(set(perm[i].tolist()) | set(experts[:, i].ravel().tolist()))
            for i in range(m.n_layers)
        ],
    )
    params, record["rounds"] = log
    _write(wd, cfg, params, nnx.to_pure_dict(rest), record)
    return record


def _check_target(wd) -> None:
    """A conversion writes a fresh workdir, or redoes one killed between its step-0 checkpoint
    and convert.json (marked by `convert.partial`, nothing trained on it since)."""
    d = wd.checkpoints_dir
    steps = {p.name for p in d.iterdir() if p.name.isdigit()} if d.is_dir() else set()
    killed = (wd.path / PARTIAL).exists() and not (wd.path / "convert.json").exists()
    if steps and not (killed and steps == {"0"}):
        raise UserError(f"{wd} already holds checkpoints; convert into a new workdir")


def _checked_config(src, cfg):
    if model_config(src.config).kind != "dense":
        raise UserError(
            f"--from={src.path} holds a '{model_config(src.config).kind}' model, not dense"
        )
    if cfg.model.ffn.kind != "pregated" or cfg.model.ffn.pregated.gate != "one":
        raise UserError(
            "convert makes a pre-gated model with hard routing: use "
            "--config=configs/pregated.py:size=<the dense size>,convert=1"
        )
    cfg = cfg.copy_and_resolve_references()
    cfg.unlock()
    for name in BACKBONE:
        if cfg.model[name] != src.config.model[name]:
            raise UserError(
                f"model.{name}={cfg.model[name]} differs from the dense model's "
                f"{src.config.model[name]}"
            )
    source = src.editable_config()
    for name in source.model:  # every backbone field as the dense model was trained
        if name != "ffn":
            cfg.model[name] = source.model[name]
    cfg.model.ffn.gated = bool(source.model.ffn.get("gated", False))  # SwiGLU experts
    cfg.data = source.data
    cfg.data.tokenizer = str(src.tokenizer_path)
    n = len(str(cfg.convert.domains).split(","))
    if n != cfg.model.ffn.pregated.experts:
        raise UserError(f"{n} domains for {cfg.model.ffn.pregated.experts} experts: one each")
    m = validate(cfg)
    if m.ffn_layers != tuple(range(m.n_layers)) or m.ffn.topk != 1:
        raise UserError(
            "convert makes every block pre-gated with top-1 paths: use "
            "model.ffn.layers=all and topk=1"
        )
    return cfg


def _domain_tokens(cfg, corpus: str) -> np.ndarray:
    """A domain's training tokens, with the dense run's tokenizer."""
    c = cfg.copy_and_resolve_references()
    c.data.corpus = corpus
    return pipeline.prepare(c).train


def _windows(tokens, n: int, seq: int, seed) -> np.ndarray:
    if len(tokens) < seq + 1:
        raise UserError(f"a domain holds {len(tokens)} tokens, fewer than one window")
    starts = np.random.default_rng(seed).integers(0, len(tokens) - seq, n)
    return pipeline.window_batch(tokens, starts, seq)[:, :seq]


def dense_activations(dense, md):
    """A jitted fn ids_BxL -> per layer W1 x [L, T, F] of the dense model (float32); for a gated
    FFN the channels' values act(gate x) * up x (what W2 reads; `channel_values` maps either
    to the values)."""
    graphdef, params, rest = nnx.split(build_model(md), nnx.Param, ...)

    def run(p, ids):
        model = nnx.merge(graphdef, p, rest)
        h = model.embed_ids(ids)
        pos = jnp.arange(ids.shape[1])
        out = []
        for block in model.blocks:
            a, x, _ = block.attend(h, pos)
            mlp = block.ffn.mlp
            if md.gated:
                pre = mlp.act(mlp.gate(x)) * mlp.up(x)
                out.append(pre.reshape(-1, pre.shape[-1]).astype(jnp.float32))
                h = a + mlp.down(pre)
                continue
            pre = mlp.up(x)
            out.append(pre.reshape(-1, pre.shape[-1]).astype(jnp.float32))
            h = a + mlp.down(mlp.act(pre))
        return jnp.stack(out)

    return jax.jit(lambda ids: run(dense, ids))


def channel_values(md):
    """What `dense_activations` gives -> the channels' values: act(W1 x), or (gated) as is."""
    return (lambda v: v) if md.gated else ACTIVATIONS[md.activation]


def _importance(dense, md, streams, cfg) -> np.ndarray:
    fn = dense_activations(dense, md)
    c = cfg.convert
    out = []
    for i, tokens in enumerate(streams):
        ids = _windows(tokens, c.calib_windows, cfg.data.seq_len, cfg.seed + i)
        out.append(np.mean(np.abs(np.asarray(fn(jnp.asarray(ids)))), axis=1))  # [L, F]
    return np.stack(out)


def select_channels(importance_NxLxF: np.ndarray, permanent: int, width: int):
    """(perm [L, P], experts [N, L, width]) channel indices, sorted. The permanent channels are
    the most important summed over domains; expert i takes domain i's most important others."""
    n, n_layers, f = importance_NxLxF.shape
    if permanent + width > f:
        raise UserError(f"permanent {permanent} + expert width {width} exceed the FFN's {f}")
    total = importance_NxLxF.sum(0)
    perm = np.sort(np.argsort(-total, axis=-1, kind="stable")[:, :permanent], axis=-1)
    experts = np.zeros((n, n_layers, width), np.int64)
    for layer in range(n_layers):
        rest = np.setdiff1d(np.arange(f), perm[layer])
        for i in range(n):
            order = np.argsort(-importance_NxLxF[i, layer, rest], kind="stable")[:width]
            experts[i, layer] = np.sort(rest[order])
    return perm, experts


def converted_params(params: dict, dense: dict, perm, experts) -> dict:
    """The pre-gated model's parameters: the dense model's backbone copied, its FFNs sliced."""
    out = jax.tree.map(lambda x: x, params)
    for name in ("embed", "norm", "head"):  # (no head when tied to the embedding)
        if name in dense:
            out[name] = dense[name]
    r = out["router"]["embed"].shape[-1]
    out["router"]["embed"] = dense["embed"][:, :r]
    for layer, block in out["blocks"].items():
        src = dense["blocks"][layer]
        for name in ("attn", "norm_attn", "norm_ffn"):
            block[name] = src[name]
        mlp = src["ffn"]["mlp"]
        w1, w2 = mlp["up"]["kernel"], mlp["down"]["kernel"]  # [D, F], [F, D]
        idx = experts[:, layer]  # [N, width]
        up = jnp.transpose(w1[:, idx], (1, 0, 2))  # [N, D, width]
        if "gate" in mlp:  # a gated expert's up is [gate | up] (layers.up_width)
            up = jnp.concatenate([jnp.transpose(mlp["gate"]["kernel"][:, idx], (1, 0, 2)), up], -1)
        block["ffn"]["up"] = up
        block["ffn"]["down"] = w2[idx]  # [N, width, D]
        if perm.shape[-1]:
            block["ffn"]["permanent"] = {
                "up": {"kernel": w1[:, perm[layer]]},
                "down": {"kernel": w2[perm[layer]]},
            }
            if "gate" in mlp:
                block["ffn"]["permanent"]["gate"] = {
                    "kernel": mlp["gate"]["kernel"][:, perm[layer]]
                }
    return out


def _tune(graphdef, params, rest, dense, md, experts, streams, cfg):
    """(params, per-round losses) after the alternating router / expert tuning rounds."""
    c, n = cfg.convert, experts.shape[0]
    acts = dense_activations(dense, md)
    n_layers, f = md.n_layers, md.d_ff
    member = np.zeros((n_layers, f, n), np.float32)
    for i in range(n):
        for layer in range(n_layers):
            member[layer, experts[i, layer], i] = 1.0
    member = jnp.asarray(member)
    act = channel_values(md)

    def merged(router, others):
        return nnx.merge(graphdef, {**others, "router": router}, rest)

    def distill(router, others, ids):
        routes, _ = merged(router, others).router(ids[:, :-1], jnp.arange(ids.shape[1] - 1))
        a = jnp.abs(act(acts(ids[:, :-1])))  # [L, T, F]
        top = jax.lax.top_k(a, f // 2)[1]  # the dense model's top-50 % active channels
        overlap = jax.vmap(lambda m_l, i_l: m_l[i_l].sum(1))(member, top).sum(0)  # [T, N]
        logp = jax.nn.log_softmax(routes.logits_TxE)
        return jnp.mean(jnp.sum(jnp.exp(logp) * (logp - jax.nn.log_softmax(overlap)), -1))

    def lm(others, router, ids):
        out = merged(router, others)(ids[:, :-1], train=True)
        return cross_entropy(out.logits_BxLxV, ids[:, 1:]) + out.aux["aux_loss"]

    router, others = params["router"], {k: v for k, v in params.items() if k != "router"}
    rounds = []
    for r in range(c.rounds):
        decay = c.round_decay**r
        router, d = _round(
            distill, router, others, c.router_steps, c.router_lr * decay, cfg, streams, (r, 0)
        )
        others, e = _round(
            lm, others, router, c.expert_steps, c.expert_lr * decay, cfg, streams, (r, 1)
        )
        rounds.append(dict(round=r, distill=d, lm=e))
    return {**others, "router": router}, rounds


def _round(loss_fn, trainable, frozen, steps: int, lr: float, cfg, streams, tag):
    """`steps` AdamW steps on `trainable` (cosine decay from lr); (trainable, first/last loss)."""
    if steps <= 0:
        return trainable, None
    tx = optax.adamw(
        optax.cosine_decay_schedule(lr, steps),
        weight_decay=cfg.convert.weight_decay,
        mask=decay_mask,
    )  # no decay on norms, as in training

    @jax.jit
    def step(tr, opt, fr, ids):
        loss, g = jax.value_and_grad(loss_fn)(tr, fr, ids)
        upd, opt = tx.update(g, opt, tr)
        return optax.apply_updates(tr, upd), opt, loss

    opt, losses = tx.init(trainable), []
    for s in range(steps):
        tokens = streams[s % len(streams)]
        ids = _windows(tokens, cfg.train.batch_size, cfg.data.seq_len + 1, [cfg.seed, *tag, s])
        trainable, opt, loss = step(trainable, opt, frozen, jnp.asarray(ids))
        losses.append(float(loss))
    k = len(streams)  # one batch of each corpus: first and last compare the same corpora
    return trainable, dict(first=float(np.mean(losses[:k])), last=float(np.mean(losses[-k:])))


def _write(wd, cfg, params: dict, rest: dict, record: dict) -> None:
    """The workdir's files (as `train` writes them), a step-0 checkpoint of `params`, then
    convert.json; `convert.partial` marks the time in between."""
    with wd.writer_lock("convert"):
        _check_target(wd)  # again, under the lock
        (wd.path / PARTIAL).touch()
        shutil.rmtree(wd.checkpoints_dir, ignore_errors=True)  # a killed conversion's, if any
        td = pipeline.prepare(cfg)  # with the dense run's tokenizer; the workdir keeps its own copy
        cfg.data.tokenizer = str(wd.tokenizer_path.resolve())
        write_workdir(cfg, wd, td.tokenizer.to_str())
        state = dict(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=make_optimizer(cfg).init(params),
            rest=rest,
        )
        ckpt = Checkpointer(wd, cfg.train.keep_ckpts, False, run_digest(cfg))
        try:
            ckpt.save(state)
        finally:
            ckpt.close()
        write_text_atomic(wd.path / "convert.json", json.dumps(record, indent=1))
        (wd.path / PARTIAL).unlink()
