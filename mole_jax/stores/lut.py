"""A MoLE lookup-table store (the `store.py` format, kind 'mole_lut'): one array per layer (and
per scale array) and batched row reads. Shared by `export` (writer) and the LUT engines.

    layer_XX/values               zarr3 [V, E, D] (nf4: [V, E, D/2] uint8)
    layer_XX/scales               int8: [V, E] float32; nf4: [V, E, D/block] float16
Shards of `shard_rows` token rows, inner chunks of `rows_per_chunk` rows (default 1: one token's
E x D values are one small read).

Reading, a store keeps every shard index in a tensorstore cache pool sized for the indexes
(16 bytes per row and array), so a row read costs one index read per shard over the life of the
store instead of one per row (without it a 2 KB row read re-reads its shard's 64 KB index).
A token's row travels as one packed byte vector ([n, bytes_per_token] uint8, see `RowLayout`):
one host->device transfer per batch, unpacked by bitcasts inside jit.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from mole_jax.errors import StoreError
from mole_jax.stores import quant, store
from mole_jax.stores.store import layer_name


@dataclasses.dataclass(frozen=True)
class Field:
    layer: int
    name: str
    shape: tuple[int, ...]  # per token, e.g. (E, D)
    dtype: np.dtype
    offset: int  # bytes into the packed row
    nbytes: int


class RowLayout:
    """Where each stored array's values for one token sit in the packed row of all layers."""

    def __init__(self, arrays: dict[int, dict[str, ts.TensorStore]]):
        fields, offset = [], 0
        for layer in sorted(arrays):
            for name, arr in arrays[layer].items():
                dtype = np.dtype(arr.dtype.numpy_dtype)
                shape = tuple(int(n) for n in arr.shape[1:])
                nbytes = int(np.prod(shape)) * dtype.itemsize
                fields.append(Field(layer, name, shape, dtype, offset, nbytes))
                offset += nbytes
        self.fields, self.row_bytes = tuple(fields), offset

    def pack(self, stored: dict[int, dict[str, np.ndarray]]) -> np.ndarray:
        """{layer: {name: [n, ...]}} -> uint8 [n, row_bytes]."""
        n = len(next(iter(next(iter(stored.values())).values())))
        out = np.empty((n, self.row_bytes), np.uint8)
        for f in self.fields:
            a = np.ascontiguousarray(stored[f.layer][f.name], f.dtype)
            out[:, f.offset : f.offset + f.nbytes] = a.reshape(n, -1).view(np.uint8)
        return out

    def unpack(self, packed_NxR: jax.Array) -> dict[int, dict[str, jax.Array]]:
        """The inverse of `pack`, in jax (bitcasts, no copies of note), for use inside jit."""
        n = packed_NxR.shape[0]
        out: dict[int, dict[str, jax.Array]] = {}
        for f in self.fields:
            raw = packed_NxR[:, f.offset : f.offset + f.nbytes]
            size = f.dtype.itemsize
            raw = raw.reshape(n, -1, size) if size > 1 else raw
            value = jax.lax.bitcast_convert_type(raw, jnp.dtype(f.dtype))
            out.setdefault(f.layer, {})[f.name] = value.reshape(n, *f.shape)
        return out


def index_cache(manifest: dict) -> ts.Context:
    """A context whose cache pool holds every shard index of the store's arrays (16 bytes per
    inner chunk). Tensorstore charges an index between one and two times its size, depending on
    the layout, so the pool is three times the indexes plus 1 MiB; whatever the indexes leave
    may keep recently read rows, which is why `LutRows.stats.io_bytes` measures the bytes the
    reads really cost next to the rows they asked for."""
    vocab, rows_per_chunk = manifest["vocab_size"], manifest["rows_per_chunk"]
    index_bytes = len(manifest["arrays"]) * 16 * -(-vocab // rows_per_chunk)
    limit = 3 * index_bytes + 2**20
    return ts.Context({"cache_pool": {"total_bytes_limit": limit}})


class LutStore:
    """Open store: `read_rows(ids)` returns every layer's stored arrays for those token ids."""

    def __init__(self, path: Path, manifest: dict, arrays: dict[int, dict[str, ts.TensorStore]]):
        self.path, self.manifest, self.arrays = path, manifest, arrays
        self.layers = tuple(sorted(arrays))
        self.dtype, self.block = manifest["dtype"], manifest["nf4_block"]
        self.row_bytes = manifest["bytes_per_token"]  # all layers, scales included
        self.layout = RowLayout(arrays)
        self.written: dict[str, hashlib._Hash] = {}
        if self.layout.row_bytes != self.row_bytes:
            raise StoreError(
                f"{path}: arrays hold {self.layout.row_bytes} bytes per token, the manifest says "
                f"{self.row_bytes}; re-run `launch.py export`"
            )

    # -- writing ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: Path,
        layers,
        shape: tuple[int, int, int],
        dtype: str,
        block: int,
        rows_per_chunk: int = 1,
        shard_rows: int = 4096,
    ) -> LutStore:
        """An empty store for `layers` of LUT shape (V, E, D) in `dtype`."""
        vocab, experts, d = shape
        arrays = {}
        for layer in layers:
            arrays[layer] = {}
            for name, (trail, dt) in quant.stored_arrays(dtype, d, block).items():
                arrays[layer][name] = store.create_array(
                    path, layer, name, (vocab, experts, *trail), dt, rows_per_chunk, shard_rows
                )
        manifest = dict(
            dtype=dtype,
            nf4_block=block,
            rows_per_chunk=rows_per_chunk,
            bytes_per_token=len(layers) * experts * quant.row_bytes(dtype, d, block),
        )
        return cls(path, manifest, arrays)

    def write_rows(self, start: int, tables: dict[int, np.ndarray]) -> None:
        """Quantises float tables {layer: [n, E, D]} and writes them at rows start..start+n
        (rows in order: the digests of what was written are kept for `finalize`)."""
        futures = []
        for layer, table in tables.items():
            for name, arr in quant.quantize(table, self.dtype, self.block).items():
                key = f"{layer_name(layer)}/{name}"
                self.written.setdefault(key, hashlib.sha256()).update(
                    np.ascontiguousarray(arr).tobytes()
                )
                futures.append(self.arrays[layer][name][start : start + len(table)].write(arr))
        for f in futures:
            f.result()

    def finalize(self, meta: dict) -> dict:
        """Reads every array back against what was written, writes manifest.json (last),
        returns the manifest."""
        first = self.arrays[self.layers[0]]["values"]
        manifest = dict(
            **meta,
            **self.manifest,
            layers=list(self.layers),
            vocab_size=int(first.shape[0]),
            experts=int(first.shape[1]),
        )
        written = {k: h.hexdigest() for k, h in self.written.items()}
        self.manifest = store.write_manifest(self.path, "mole_lut", manifest, self.arrays, written)
        return self.manifest

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path, expect: dict | None = None, verify: str = "auto") -> LutStore:
        """Opens and checks a store. `expect`: manifest fields that must match (for example the
        params_digest of the checkpoint in use). verify: 'full' | 'auto' | 'none' (per-chunk
        crc32c checks still apply to every read)."""
        path = Path(path)
        manifest = store.read_manifest(path, "mole_lut", expect)
        arrays = store.open_arrays(path, manifest, verify, index_cache(manifest))
        return cls(path, manifest, arrays)

    def read_rows(self, ids: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
        """{layer: {name: rows for ids}}: one batched read per array, all in flight at once."""
        ids = np.asarray(ids, np.int64)
        futures = {
            (layer, name): arr[ids].read()
            for layer, group in self.arrays.items()
            for name, arr in group.items()
        }
        out: dict[int, dict[str, np.ndarray]] = {layer: {} for layer in self.arrays}
        for (layer, name), fut in futures.items():
            try:
                out[layer][name] = fut.result()
            except ValueError as e:
                where = f"{self.path}/{layer_name(layer)}/{name}"
                raise StoreError(
                    f"reading {where} failed ({store.short(e)}); the store is corrupt, re-export it"
                ) from None
        return out

    def read_packed(self, ids: np.ndarray) -> np.ndarray:
        """uint8 [len(ids), row_bytes]: every layer's stored values for `ids`, packed."""
        return self.layout.pack(self.read_rows(ids))

    def read_all(self) -> np.ndarray:
        """The whole table, packed: uint8 [V, row_bytes]."""
        stored = {
            layer: {name: arr.read().result() for name, arr in group.items()}
            for layer, group in self.arrays.items()
        }
        return self.layout.pack(stored)
