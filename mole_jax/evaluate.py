"""`launch.py eval`: validation loss and perplexity of a workdir's checkpoint, in memory or with the
MoLE lookup tables offloaded to storage. Writes `<workdir>/eval/<name>.json`.

The batches are the fixed validation windows the training run evaluated on (`train.eval_batches`
batches of `data.seq_len`), so the in-memory number equals the run's own `val_loss` at that step.
With `--data` another corpus is tokenized with the run's tokenizer and its held-out split is used.
Offloaded, the next batch's rows are read in a background thread while the current batch runs.
"""

from __future__ import annotations

import json
import os
import resource
import time

import numpy as np

from mole_jax import data
from mole_jax.config import load_config
from mole_jax.inference import build_engine
from mole_jax.offload.rows import Prefetcher


def eval_batches(workdir: str, corpus: str | None = None, n_batches: int | None = None):
    cfg = load_config(workdir)
    cfg.data.tokenizer = tokenizer_path(workdir)
    if corpus:
        cfg.data.corpus = corpus
    td = data.prepare(cfg)
    t = cfg.train
    return list(
        data.eval_batches(
            td.val, t.batch_size // t.microbatches, cfg.data.seq_len, n_batches or t.eval_batches
        )
    )


def tokenizer_path(workdir: str) -> str:
    path = os.path.join(workdir, "tokenizer.json")
    if not os.path.exists(path):
        from mole_jax.errors import UserError

        raise UserError(
            f"{path} is missing: is '{workdir}' a workdir written by `launch.py train`?"
        )
    return path


def evaluate(
    workdir: str,
    offload: bool = False,
    corpus: str | None = None,
    step=None,
    lut: str = "lut",
    n_batches: int | None = None,
    cache_rows: int = 4096,
    mode: str | None = None,
    write: bool = True,
) -> dict:
    """Loss over the validation windows; `mode` overrides experts/offload (e.g. 'lut_memory')."""
    mode = mode or ("offload" if offload else "experts")
    batches = eval_batches(workdir, corpus, n_batches)
    engine = build_engine(workdir, mode, step, lut, cache_rows)
    t0 = time.perf_counter()
    losses = []
    if mode == "offload":
        # Rows of batch i+1 are read while batch i computes: prepare() runs in the thread.
        pre = Prefetcher(lambda b: (b, engine.prepare(np.asarray(b[:, :-1], np.int32))))
        for b, extra in pre.map(batches):
            logits, _ = engine.run(engine.params, engine.rest, b[:, :-1], extra, None)
            losses.append(_ce(logits, b[:, 1:]))
        pre.close()
    else:
        losses = [engine.loss(b) for b in batches]
    loss = float(np.mean(losses))
    tokens = sum(b[:, 1:].size for b in batches)
    out = {
        "loss": loss,
        "ppl": float(np.exp(loss)),
        "tokens": int(tokens),
        "batches": len(batches),
        "mode": mode,
        "step": engine.step,
        "corpus": corpus or load_config(workdir).data.corpus,
        "seconds": time.perf_counter() - t0,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "resident_param_bytes": engine.resident_bytes(),
    }
    if engine.store is not None:
        out["lut_dtype"] = engine.store.dtype
        out["bytes_per_token"] = engine.store.row_bytes  # one token's rows, all layers + scales
    if engine.rows is not None:
        s = engine.rows.stats
        out.update(
            bytes_read=s.bytes_read,
            io_bytes=s.io_bytes,
            rows_read=s.rows_read,
            cache_hit_rate=s.hit_rate,
            bytes_read_per_position=s.bytes_read / tokens,
        )
    if write:
        name = "val" + {"experts": "", "offload": "_offload", "lut_memory": "_lut"}[mode]
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
        with open(os.path.join(workdir, "eval", f"{name}.json"), "w") as f:
            json.dump(out, f, indent=2)
    return out


def _ce(logits, targets) -> float:
    from mole_jax.losses import cross_entropy

    return float(cross_entropy(logits, np.asarray(targets)))
