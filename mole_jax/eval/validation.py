"""`launch.py eval`: validation loss and perplexity of a workdir's checkpoint through any engine
(in memory, LUT in memory, LUT offloaded, MoE experts offloaded). Writes
`<workdir>/eval/<name>.json`.

The batches are consecutive windows of `data.seq_len` from the start of the validation split,
the whole split by default (`--max_tokens` caps it; `n_batches=train.eval_batches` gives exactly
the windows the training run evaluated on, so the in-memory number equals the run's own
`val_loss` at that step). With `--data` another corpus is tokenized with the run's tokenizer and
its held-out split is used. Batches are read from the memory-mapped tokens as they are needed.
Each batch's host work (`Engine.prepare`: reading LUT rows) runs in a background thread while
the previous batch computes.
"""

from __future__ import annotations

import json
import resource
import time

import numpy as np

from mole_jax.data import pipeline
from mole_jax.errors import UserError
from mole_jax.files import write_text_atomic
from mole_jax.infer.engine import Engine, build_engine
from mole_jax.infer.offload.rows import Prefetcher
from mole_jax.progress import Progress
from mole_jax.stores.location import io_counters, io_since
from mole_jax.workdir import Workdir, as_workdir

EVAL_NAMES = {"experts": "val", "offload": "val_offload", "lut_memory": "val_lut"}
# What each engine mode is called where a person reads it.
MODE_NAMES = {
    "experts": "in memory",
    "lut_memory": "LUT in memory",
    "offload": "LUT offloaded",
    "moe_offload": "MoE experts offloaded",
    "lookahead": "pre-gated, experts offloaded",
}


def val_batches(workdir, corpus=None, n_batches: int | None = None, max_tokens: int | None = None):
    """The validation windows of the run's corpus (or of `corpus`, with the run's tokenizer):
    `n_batches` batches, or those within `max_tokens` target tokens, or all of them."""
    wd = as_workdir(workdir)
    cfg = wd.editable_config()
    cfg.data.tokenizer = str(wd.tokenizer_path)
    wd.tokenizer()  # a missing tokenizer.json is named before any corpus is read
    if corpus:
        cfg.data.corpus = corpus
    if corpus and corpus.startswith("files:"):  # files named to evaluate on: all of them
        tokens = pipeline.eval_tokens(cfg, wd.tokenizer())
    else:
        tokens = pipeline.prepare(cfg).val
    t = cfg.train
    batch = t.batch_size // t.microbatches
    if n_batches is None:
        n_batches = len(tokens) if max_tokens is None else max_tokens // (batch * cfg.data.seq_len)
        if n_batches < 1:
            raise UserError(
                f"--max_tokens={max_tokens} is less than one batch of {batch} x "
                f"{cfg.data.seq_len} tokens"
            )
    return pipeline.val_windows(tokens, batch, cfg.data.seq_len, n_batches)


def evaluate_engine(engine: Engine, batches) -> dict:
    """Mean loss of `engine` over `batches` (any iterable), with its storage counters and
    resident bytes."""
    engine.reset_stats()
    io_start = io_counters()
    t0 = time.perf_counter()
    pre = Prefetcher(lambda b: (b, engine.prepare(np.asarray(b[:, :-1], np.int32))))
    losses, tokens = [], 0
    total = len(batches) if hasattr(batches, "__len__") else None
    try:
        with Progress(f"eval ({MODE_NAMES.get(engine.mode, engine.mode)})", total, 0, "batch") as p:
            for b, prepared in pre.map(batches):
                losses.append(engine.loss(b, prepared))
                tokens += b[:, 1:].size
                p.update(1, loss=float(np.mean(losses)))
    finally:
        pre.close()
    loss = float(np.mean(losses))
    out = {
        "loss": loss,
        "ppl": float(np.exp(loss)),
        "tokens": int(tokens),
        "batches": len(losses),
        "mode": engine.mode,
        "step": engine.step,
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "resident_param_bytes": engine.resident_bytes(),
        **engine.info,
    }
    stats = engine.stats()
    out.update(stats)
    requests, nbytes = io_since(io_start)
    out.update(io_requests=requests, io_bytes=nbytes)  # what storage served, all engines alike
    if "bytes_read" in stats:
        out["bytes_read_per_position"] = stats["bytes_read"] / tokens
    return out


def evaluate(
    workdir: str | Workdir,
    mode: str = "experts",
    corpus: str | None = None,
    step: int | None = None,
    n_batches: int | None = None,
    write: bool = True,
    max_tokens: int | None = None,
    **options,
) -> dict:
    """The loss of a workdir's checkpoint through the engine of `mode` (engine.MODES) over its
    validation split (`val_batches`); options go to `build_engine` (store, cache_rows, ...)."""
    wd = as_workdir(workdir)
    batches = val_batches(wd, corpus, n_batches, max_tokens)
    engine = build_engine(wd, mode, step, **options)
    out = evaluate_engine(engine, batches)
    out["corpus"] = corpus or wd.config.data.corpus
    if write:
        record(wd, mode, out)
    return out


def record(workdir, mode: str, out: dict) -> None:
    """Writes an `evaluate` result to the workdir's eval/ folder."""
    wd = as_workdir(workdir)
    write_text_atomic(wd.eval_path(EVAL_NAMES.get(mode, f"val_{mode}")), json.dumps(out, indent=2))
