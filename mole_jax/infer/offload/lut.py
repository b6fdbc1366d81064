"""MoLE's inference engines over an exported LUT store (`stores/lut.py`):

    lut_memory  the whole LUT in device memory, packed; the batch's rows gathered inside jit
    offload     for each call the host reads the rows of the distinct token ids from the store
                (through a row cache) as one packed byte array padded to the static table size,
                and hands it to the jitted forward, which unpacks and dequantises it. No I/O
                inside jit; neither expert weights nor the LUT are ever in device memory.

Both build the model's 'lut' form (no expert parameters), restore only its parameters, and run
`model.forward` with the rows as token tables. The store's manifest must name the parameter
digest of the checkpoint in use.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from mole_jax.data.dedup import dedup_bucket, host_dedup, unique_inverse
from mole_jax.infer.engine import BaseEngine, tree_bytes
from mole_jax.infer.offload.rows import LutRows
from mole_jax.model.layers import compute_dtype
from mole_jax.stores import quant
from mole_jax.stores.lut import LutStore
from mole_jax.train.checkpoint import restore_model


class LutEngine(BaseEngine):
    """Engine modes 'lut_memory' and 'offload'. options: store (directory, default 'lut'),
    cache_rows (offload: tokens in the LRU row cache; 0 disables it), verify (store checksums on
    open: 'auto' | 'full' | 'none')."""

    def __init__(self, wd, mode, step=None, store="lut", cache_rows=4096, verify="auto"):
        from mole_jax.infer.export import check_exportable

        super().__init__(wd, mode)
        m = self.model_config
        check_exportable(m, wd)
        model = restore_model(wd, m, "lut", step)
        self.store = LutStore.open(
            wd.store(store), verify=verify, expect={"params_digest": model.params_digest}
        )
        self.params, self.rest, self.step = model.params, model.rest, model.step
        self._run = jax.jit(_run(model.graphdef, self.store))
        self.info = dict(lut_dtype=self.store.dtype, bytes_per_token=self.store.row_bytes)
        self.lut = jax.device_put(self.store.read_all()) if mode == "lut_memory" else None
        self.rows = LutRows(self.store, cache_rows) if mode == "offload" else None

    def prepare(self, ids_BxL):
        """(packed rows, gather, inv): numpy where possible, since jit's own argument transfer
        is the cheapest."""
        ids = self.check(ids_BxL)
        vocab = self.model_config.vocab_size
        if self.lut is not None:  # LUT in memory: the rows are picked inside jit
            uniq, inv = host_dedup(ids, vocab)
            return self.lut, uniq, inv
        real, inv = unique_inverse(ids)
        packed = self.rows.fetch(real, dedup_bucket(len(real), vocab))
        return packed, None, inv.reshape(ids.shape).astype(np.int32)

    def forward(self, ids_BxL, cache=None, prepared=None):
        ids = self.check(ids_BxL)
        prepared = self.prepare(ids) if prepared is None else prepared
        return self._run(self.params, self.rest, ids, prepared, cache)

    def stats(self) -> dict:
        if self.rows is None:
            return {}
        s = self.rows.stats
        return dict(
            lookups=s.lookups,
            hits=s.hits,
            rows_read=s.rows_read,
            bytes_read=s.bytes_read,
            io_bytes=s.io_bytes,
            io_requests=s.io_requests,
            cache_hit_rate=s.hit_rate,
        )

    def reset_stats(self) -> None:
        if self.rows is not None:
            self.rows.reset()

    def resident_bytes(self) -> int:
        return tree_bytes(self.params, self.lut)


def _run(graphdef, store: LutStore):
    def run(params, rest, ids, prepared, cache):
        model = nnx.merge(graphdef, params, rest)
        packed, gather, inv = prepared  # packed rows [U, row_bytes] (or [V, ...] with gather)
        if gather is not None:
            packed = packed[gather]
        dt, kind, block = compute_dtype(model), store.dtype, store.block
        stored = store.layout.unpack(packed)
        tables = {i: quant.dequantize(s, kind, block, dt)[None] for i, s in stored.items()}
        out = model(ids, tables=tables, inv_BxL=inv, cache=cache)
        return out.logits_BxLxV, out.cache

    return run
