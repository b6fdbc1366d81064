"""The LUT store's read path on stores written here: packed rows, the row cache, and the shard
index cache (a row read must not re-read its shard's index)."""

import jax
import numpy as np
import pytest

from mole_jax.infer.offload.rows import LutRows
from mole_jax.stores import quant
from mole_jax.stores.location import io_counters
from mole_jax.stores.lut import LutStore

V, E, D, LAYERS = 2048, 2, 64, (0, 1, 3)


def _store(path, dtype, seed=0):
    """A finalized store of random tables; returns (store opened for reading, float tables)."""
    rng = np.random.default_rng(seed)
    tables = {i: rng.normal(size=(V, E, D)).astype(np.float32) for i in LAYERS}
    store = LutStore.create(path, LAYERS, (V, E, D), dtype, block=32)
    for start in range(0, V, 512):
        store.write_rows(start, {i: t[start : start + 512] for i, t in tables.items()})
    store.finalize({"params_digest": "test"})
    return LutStore.open(path, verify="full"), tables


@pytest.mark.parametrize("dtype", quant.DTYPES)
def test_packed_rows_unpack_to_the_stored_arrays(tmp_path, dtype):
    store, tables = _store(tmp_path / "lut", dtype)
    ids = np.array([0, 5, 2047, 77], np.int64)
    packed = store.read_packed(ids)
    assert packed.shape == (4, store.row_bytes) and packed.dtype == np.uint8
    unpacked = jax.jit(store.layout.unpack)(packed)
    direct = store.read_rows(ids)
    for layer in LAYERS:
        for name, want in direct[layer].items():
            got = np.asarray(unpacked[layer][name])
            assert got.dtype == want.dtype
            np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
        want = quant.dequantize(quant.quantize(tables[layer][ids], dtype, 32), dtype, 32)
        got = quant.dequantize(unpacked[layer], dtype, 32)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_row_cache_returns_the_stored_rows_and_counts_hits(tmp_path):
    store, _ = _store(tmp_path / "lut", "float16")
    rows = LutRows(store, cache_rows=3)
    rng = np.random.default_rng(1)
    for _ in range(40):  # small cache, ids from a small range: hits, misses and evictions
        ids = np.unique(rng.integers(0, 8, rng.integers(1, 5)))
        got = rows.fetch(ids, size=6)
        np.testing.assert_array_equal(got[: len(ids)], store.read_packed(ids))
        assert not got[len(ids) :].any()
        assert len(rows.slot) <= 3
    s = rows.stats
    assert 0 < s.hits < s.lookups and s.rows_read == s.lookups - s.hits
    assert s.bytes_read == s.rows_read * store.row_bytes


def test_row_cache_is_lru(tmp_path):
    store, _ = _store(tmp_path / "lut", "float32")
    rows = LutRows(store, cache_rows=2)
    for ids in ([1], [2], [1], [3]):  # 3 evicts 2 (least recent), not 1
        rows.fetch(np.array(ids))
    assert list(rows.slot) == [1, 3]
    rows.fetch(np.array([1, 2]))
    assert rows.stats.hits == 2  # the second [1] and the last 1


def test_a_row_read_does_not_reread_the_shard_index(tmp_path):
    _store(tmp_path / "lut", "float16")  # one shard per array: 32 KB index each
    store = LutStore.open(tmp_path / "lut", verify="none")  # nothing read yet
    store.read_packed(np.array([0]))  # first read of each shard loads its index
    requests, before = io_counters()
    for t in range(1, 21):
        store.read_packed(np.array([t * 97]))
    after = io_counters()
    per_row = (after[1] - before) / 20
    assert store.row_bytes <= per_row < 2 * store.row_bytes, (per_row, store.row_bytes)
    n_arrays = len(store.arrays)  # one read of one chunk per array and row: no index reread
    assert after[0] - requests == 20 * n_arrays, (after[0] - requests, n_arrays)
