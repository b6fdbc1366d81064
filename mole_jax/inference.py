"""Inference engines over a trained workdir, and the decode loop.

    experts     the training-form model, all parameters in memory (any FFN kind)
    lut_memory  MoLE's inference form with its LUT in device memory (rows gathered inside jit)
    offload     MoLE's inference form; for each call the host reads the rows of the distinct
                token ids from the tensorstore LUT (through a row cache) as one packed byte array
                padded to the static table size, and hands it to the jitted forward, which
                unpacks and dequantises it. No I/O inside jit, and neither expert weights nor the
                LUT are ever in device memory.

In the LUT modes the model is built with `model.ffn.mole.lut_form=True` (no expert parameters)
and only the resident parameters are restored from the checkpoint. The store's manifest must name
the same parameter digest as the checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mole_jax import quant
from mole_jax.attention import init_kv
from mole_jax.checkpoint import Checkpointer
from mole_jax.config import load_config
from mole_jax.errors import UserError
from mole_jax.export import check_exportable, restore_model
from mole_jax.layers import compute_dtype
from mole_jax.losses import cross_entropy
from mole_jax.lut_store import LutStore
from mole_jax.model import Transformer, check_ids, dedup_bucket, host_dedup, unique_inverse
from mole_jax.offload.rows import LutRows

MODES = ("experts", "lut_memory", "offload")


@dataclasses.dataclass
class Engine:
    """`forward(ids_BxL, cache) -> (logits, cache)` and `loss(batch_BxL1)` for one mode."""

    cfg: Any
    mode: str
    graphdef: Any
    params: Any
    rest: Any
    step: int
    run: Callable  # jitted: (params, rest, ids, extra, cache) -> (logits, cache)
    prepare: Callable  # host: ids -> extra device arguments
    rows: LutRows | None = None
    store: LutStore | None = None

    def forward(self, ids_BxL, cache=None):
        ids_BxL = np.asarray(ids_BxL, np.int32)
        check_ids(ids_BxL, self.cfg.model.vocab_size)
        return self.run(self.params, self.rest, ids_BxL, self.prepare(ids_BxL), cache)

    def loss(self, batch_BxL1) -> float:
        logits, _ = self.forward(batch_BxL1[:, :-1])
        return float(cross_entropy(logits, jnp.asarray(batch_BxL1[:, 1:])))

    def init_cache(self, batch: int, length: int):
        return new_cache(self.cfg.model, batch, length)

    def resident_bytes(self) -> int:
        """Bytes of the parameters (and in-memory LUT) this engine keeps in device memory."""
        extra = getattr(self.prepare, "resident", None)
        leaves = jax.tree.leaves(self.params) + jax.tree.leaves(extra)
        return int(sum(x.size * x.dtype.itemsize for x in leaves))


def new_cache(m, batch: int, length: int) -> dict:
    """An empty KV cache for `length` positions, refused beyond model.max_seq_len."""
    if length > m.max_seq_len:
        raise UserError(f"{length} tokens exceed model.max_seq_len={m.max_seq_len}")
    layers = [init_kv(batch, length, m, compute_dtype(m)) for _ in range(m.n_layers)]
    return {"index": jnp.zeros((), jnp.int32), "layers": layers}


def _run_fn(graphdef, store: LutStore | None = None):
    def run(params, rest, ids, extra, cache):
        model = nnx.merge(graphdef, params, rest)
        if extra is None:
            out = model(ids, cache=cache)
        else:
            packed, gather, inv = extra  # packed rows [U, row_bytes] (or [V, ...] with gather)
            if gather is not None:  # LUT in memory: pick the batch's rows inside jit
                packed = packed[gather]
            dt, kind, block = compute_dtype(model), store.dtype, store.block
            stored = store.layout.unpack(packed)
            tables = {i: quant.dequantize(s, kind, block, dt) for i, s in stored.items()}
            out = model(ids, tables=tables, inv_BxL=inv, cache=cache)
        return out.logits_BxLxV, out.cache

    return jax.jit(run)


def build_engine(
    workdir: str,
    mode: str = "experts",
    step: int | None = None,
    lut: str = "lut",
    cache_rows: int = 4096,
    verify: str = "auto",
) -> Engine:
    if mode not in MODES:
        raise UserError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "experts":
        cfg, graphdef, params, rest, meta = restore_model(workdir, step)
        return Engine(
            cfg,
            mode,
            graphdef,
            params,
            rest,
            int(meta["step"]),
            _run_fn(graphdef),
            prepare=lambda ids: None,
        )
    cfg = load_config(workdir)
    check_exportable(cfg, workdir)
    ckpt = Checkpointer(workdir)
    try:
        meta = ckpt.meta(step)
        store = LutStore.open(
            os.path.join(workdir, lut),
            verify=verify,
            expect={"params_sha256": meta["params_sha256"]},
        )
        cfg.model.ffn.mole.update(dict(lut_form=True, impl="unique"))
        abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
        graphdef, like, rest = nnx.split(abstract, nnx.Param, ...)
        params = ckpt.restore_subset(nnx.to_pure_dict(like), int(meta["step"]))
    finally:
        ckpt.close()
    rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.to_pure_dict(rest))
    run = _run_fn(graphdef, store)
    vocab = cfg.model.vocab_size
    rows = None
    if mode == "lut_memory":
        lut_dev = jax.device_put(store.read_all())

        def prepare(ids):
            uniq, inv = host_dedup(ids, vocab)
            return lut_dev, uniq, inv  # numpy: jit's own argument transfer is the cheapest

        prepare.resident = lut_dev
    else:
        rows = LutRows(store, cache_rows)

        def prepare(ids):  # numpy out, as above
            real, inv = unique_inverse(ids)
            packed = rows.fetch(real, dedup_bucket(len(real), vocab))
            return packed, None, inv.reshape(ids.shape).astype(np.int32)

    step = int(meta["step"])
    return Engine(cfg, mode, graphdef, params, rest, step, run, prepare, rows=rows, store=store)


def sample(logits_BxV: np.ndarray, temperature: float, top_k: int, rng) -> np.ndarray:
    """Greedy when temperature == 0, else softmax(logits / T) over the top_k (0: all) tokens."""
    if temperature <= 0:
        return logits_BxV.argmax(-1).astype(np.int32)
    z = logits_BxV.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(len(row), p=row) for row in p], np.int32)


def decode(
    engine, prompt_BxP, max_new: int, temperature=0.0, top_k=0, seed=0, before_step=None
) -> dict:
    """Prefill the prompt, then sample `max_new` tokens one at a time with the KV cache.

    `engine`: an `Engine` or anything with its forward/init_cache (the MoE offload engine).
    `before_step(t)`, if given, runs untimed before forward call t (0: the prefill).
    Returns {'tokens' [B, max_new], 'prefill_s', 'step_s' (per decode step, blocked)}.
    """
    steps = decode_steps(engine, prompt_BxP, max_new, temperature, top_k, seed, before_step)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def decode_steps(
    engine, prompt_BxP, max_new: int, temperature=0.0, top_k=0, seed=0, before_step=None
):
    """`decode` as a generator that yields after the prefill and after every decode step (so
    that a benchmark can interleave several engines step by step); returns decode's dict."""
    hook = before_step or (lambda t: None)
    prompt = np.asarray(prompt_BxP, np.int32)
    b, p = prompt.shape
    rng = np.random.default_rng(seed)
    cache = engine.init_cache(b, p + max_new)
    hook(0)
    t0 = time.perf_counter()
    logits, cache = engine.forward(prompt, cache)
    last = np.asarray(logits[:, -1])
    prefill_s = time.perf_counter() - t0
    yield
    tokens, step_s = [], []
    for t in range(max_new):
        nxt = sample(last, temperature, top_k, rng)
        tokens.append(nxt)
        if t + 1 == max_new:
            break
        hook(t + 1)
        t0 = time.perf_counter()
        logits, cache = engine.forward(nxt[:, None], cache)
        last = np.asarray(logits[:, -1])
        step_s.append(time.perf_counter() - t0)
        yield
    return {"tokens": np.stack(tokens, axis=1), "prefill_s": prefill_s, "step_s": step_s}
