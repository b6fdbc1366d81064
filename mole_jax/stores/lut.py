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

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from mole_jax.errors import StoreError
from mole_jax.stores import quant, store
from mole_jax.stores.location import wait
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
    """Where each stored array's values for one token sit in the packed row of all layers.
    `specs`: [(layer, name, per-token shape, dtype name)] in row order."""

    def __init__(self, specs):
        fields, offset = [], 0
        for layer, name, shape, dtype in specs:
            dtype = np.dtype(store.EXTRA_DTYPES.get(dtype, dtype))
            nbytes = int(np.prod(shape)) * dtype.itemsize
            fields.append(Field(int(layer), name, tuple(map(int, shape)), dtype, offset, nbytes))
            offset += nbytes
        self.fields, self.row_bytes = tuple(fields), offset

    def specs(self) -> list:
        return [[f.layer, f.name, list(f.shape), f.dtype.name] for f in self.fields]

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

    def unpack_np(self, packed_NxR: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
        """`unpack` on the host (numpy views)."""
        n = packed_NxR.shape[0]
        out: dict[int, dict[str, np.ndarray]] = {}
        for f in self.fields:
            raw = np.ascontiguousarray(packed_NxR[:, f.offset : f.offset + f.nbytes])
            out.setdefault(f.layer, {})[f.name] = raw.view(f.dtype).reshape(n, *f.shape)
        return out


def index_cache(manifest: dict) -> dict:
    """A context whose cache pool holds every shard index of the store's arrays (16 bytes per
    inner chunk). Tensorstore charges an index between one and two times its size, depending on
    the layout, so the pool is three times the indexes plus 1 MiB; whatever the indexes leave
    may keep recently read rows, which is why `LutRows.stats.io_bytes` measures the bytes the
    reads really cost next to the rows they asked for."""
    vocab, rows_per_chunk = manifest["vocab_size"], manifest["rows_per_chunk"]
    index_bytes = len(manifest["arrays"]) * 16 * -(-vocab // rows_per_chunk)
    limit = 3 * index_bytes + 2**20
    return {"cache_pool": {"total_bytes_limit": limit}}


class LutStore:
    """Open store: `read_packed(ids)` returns every layer's stored values for those token ids.

    Two layouts: `layers` (an array per layer and per scale array: a token costs one read per
    array) and `packed` (one uint8 array [V, bytes_per_token] of the packed rows: a token costs
    one read, the layout for object storage, where each read is a round trip)."""

    def __init__(self, loc, manifest: dict, arrays: dict[str, ts.TensorStore]):
        self.path, self.manifest, self.arrays = loc, manifest, arrays
        self.dtype, self.block = manifest["dtype"], manifest["nf4_block"]
        self.row_bytes = manifest["bytes_per_token"]  # all layers, scales included
        self.packed = manifest.get("layout", "layers") == "packed"
        if self.packed:
            self.layout = RowLayout(manifest["fields"])
        else:
            grouped = store.by_layer(arrays)
            self.layout = RowLayout(
                (layer, name, arr.shape[1:], arr.dtype.name)
                for layer in sorted(grouped) for name, arr in grouped[layer].items()
            )  # fmt: skip
        self.layers = tuple(sorted({f.layer for f in self.layout.fields}))
        self.written: dict[str, hashlib._Hash] = {}
        if self.layout.row_bytes != self.row_bytes:
            raise StoreError(
                f"{loc}: arrays hold {self.layout.row_bytes} bytes per token, the manifest says "
                f"{self.row_bytes}; re-run `launch.py export`"
            )

    # -- writing ---------------------------------------------------------------------------
    @classmethod
    def create(
        cls, target, layers, shape: tuple[int, int, int], dtype: str, block: int,
        rows_per_chunk: int = 1, shard_rows: int = 4096, layout: str = "layers",
    ) -> LutStore:  # fmt: skip
        """An empty store for `layers` of LUT shape (V, E, D) in `dtype`, written to `target`
        (a `store.Staging`, or a folder / URL written in place)."""
        target = store.Staging.at(target)
        vocab, experts, d = shape
        specs = [(layer, name, (experts, *trail), dt) for layer in layers
                 for name, (trail, dt) in quant.stored_arrays(dtype, d, block).items()]  # fmt: skip
        row_layout = RowLayout(specs)
        if layout == "packed":
            shape_ = (vocab, row_layout.row_bytes)
            arrays = {"rows": store.create_array(target, None, "rows", shape_, "uint8",
                                                 rows_per_chunk, shard_rows)}  # fmt: skip
        elif layout == "layers":
            arrays = {
                f"{layer_name(layer)}/{name}": store.create_array(
                    target, layer, name, (vocab, *per), dt, rows_per_chunk, shard_rows
                )
                for layer, name, per, dt in specs
            }
        else:
            raise StoreError(f"--layout={layout}: use layers|packed")
        manifest = dict(
            dtype=dtype, nf4_block=block, rows_per_chunk=rows_per_chunk, layout=layout,
            bytes_per_token=row_layout.row_bytes, layers=list(layers), vocab_size=vocab,
            experts=experts,
        )  # fmt: skip
        if layout == "packed":
            manifest["fields"] = row_layout.specs()
        out = cls(target.root, manifest, arrays)
        out.target = target
        return out

    def write_rows(self, start: int, tables: dict[int, np.ndarray]) -> None:
        """Quantises float tables {layer: [n, E, D]} and writes them at rows start..start+n
        (rows in order: the digests of what was written are kept for `finalize`)."""
        stored = {layer: quant.quantize(t, self.dtype, self.block) for layer, t in tables.items()}
        if self.packed:
            parts = {"rows": self.layout.pack(stored)}
        else:
            parts = {
                f"{layer_name(i)}/{name}": a for i, g in stored.items() for name, a in g.items()
            }
        futures = []
        for key, arr in parts.items():
            arr = np.ascontiguousarray(arr)
            self.written.setdefault(key, hashlib.sha256()).update(arr.tobytes())
            futures.append((key, self.arrays[key][start : start + len(arr)].write(arr)))
        for key, f in futures:
            wait(f, f"writing {self.path}/{key}")

    def finalize(self, meta: dict) -> dict:
        """Reads every array back against what was written, writes manifest.json (last),
        returns the manifest."""
        written = {k: h.hexdigest() for k, h in self.written.items()}
        self.manifest = store.write_manifest(
            self.target, "mole_lut", dict(**meta, **self.manifest), self.arrays, written
        )
        return self.manifest

    # -- reading ---------------------------------------------------------------------------
    @classmethod
    def open(cls, path, expect: dict | None = None, verify: str = "auto") -> LutStore:
        """Opens and checks a store (a folder or a URL). `expect`: manifest fields that must
        match (for example the params_digest of the checkpoint in use). verify: 'full' | 'auto'
        | 'none' (per-chunk crc32c checks still apply to every read)."""
        loc = store.location(path)
        manifest = store.read_manifest(loc, "mole_lut", expect)
        arrays = store.open_arrays(loc, manifest, verify, index_cache(manifest))
        return cls(loc, manifest, arrays)

    def _result(self, key: str, future):
        try:
            return future.result()
        except ValueError as e:
            raise StoreError(
                f"reading {self.path}/{key} failed ({store.short(e)}); the store is corrupt or "
                "incomplete, re-export it"
            ) from None

    def read_rows(self, ids: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
        """{layer: {name: rows for ids}}: one batched read per array, all in flight at once."""
        ids = np.asarray(ids, np.int64)
        if self.packed:
            return self.layout.unpack_np(self.read_packed(ids))
        futures = {key: arr[ids].read() for key, arr in self.arrays.items()}
        return store.by_layer({key: self._result(key, f) for key, f in futures.items()})

    def read_packed(self, ids: np.ndarray) -> np.ndarray:
        """uint8 [len(ids), row_bytes]: every layer's stored values for `ids`, packed (a packed
        store: one read per token, all in flight at once)."""
        if self.packed:
            ids = np.asarray(ids, np.int64)
            return self._result("rows", self.arrays["rows"][ids].read())
        return self.layout.pack(self.read_rows(ids))

    def read_all(self) -> np.ndarray:
        """The whole table, packed: uint8 [V, row_bytes]."""
        futures = {key: arr.read() for key, arr in self.arrays.items()}
        got = {key: self._result(key, f) for key, f in futures.items()}
        return got["rows"] if self.packed else self.layout.pack(store.by_layer(got))
