"""The MoE expert-offloading baseline's store (the `store.py` format, kind 'moe_experts'): every
routed expert's weights, one chunk per expert, so loading an expert is one read of 2·D·F values.

    layer_XX/up          zarr3 [E, D, F], inner chunk [1, D, F]
    layer_XX/down        zarr3 [E, F, D], inner chunk [1, F, D]
Float dtypes (float32 / float16 / bfloat16) store the weights as they are; int4 / int3 / int2
(`quant.GROUP_DTYPES`: group-wise min-max along the last axis) store `<name>` as the packed codes
[E, rows, cols*b/8] with `<name>_scales` and `<name>_zeros` [E, rows, cols/g] beside them, and
an expert read returns those three arrays per weight (dequantised on the device by the engine).
"""

from __future__ import annotations

import hashlib

import numpy as np
import tensorstore as ts

from mole_jax.errors import StoreError
from mole_jax.stores import quant, store
from mole_jax.stores.location import wait
from mole_jax.stores.store import layer_name

NAMES = ("up", "down")


class ExpertStore:
    """`start_read(layer, e)` starts reading one expert; `.result()` is (up [D,F], down [F,D])."""

    def __init__(self, loc, manifest: dict, arrays: dict[int, dict[str, ts.TensorStore]]):
        self.path, self.manifest, self.arrays = loc, manifest, arrays
        self.layers = tuple(sorted(arrays))
        self.dtype = manifest["dtype"]
        self.expert_bytes = manifest["bytes_per_expert"]

    @classmethod
    def open(cls, path, expect: dict | None = None, verify: str = "auto") -> ExpertStore:
        """Opens and checks a store (a folder or a URL; see `LutStore.open`)."""
        loc = store.location(path)
        manifest = store.read_manifest(loc, "moe_experts", expect)
        # the shard indexes (16 bytes per expert and array) stay cached: an expert read is one
        # request, not an index read and then the expert (two round trips on object storage)
        index = 16 * len(manifest["arrays"]) * manifest["experts"]
        cache = {"cache_pool": {"total_bytes_limit": 3 * index + 2**16}}
        arrays = store.open_arrays(loc, manifest, verify, cache)
        return cls(loc, manifest, store.by_layer(arrays))

    @staticmethod
    def write(target, experts: dict[int, dict[str, np.ndarray]], dtype: str, fields: dict):
        """Writes {layer: {'up': [E, D, F], 'down': [E, F, D]}} in `dtype` and the manifest
        (with `fields`) to `target` (a `store.Staging`, or a folder / URL written in place),
        read back against what was written. Returns the manifest."""
        target = store.Staging.at(target)
        arrays, written = {}, {}
        for i, weights in experts.items():
            for name in NAMES:
                for key, w in _stored(np.asarray(weights[name]), name, dtype).items():
                    w = np.ascontiguousarray(w)
                    arr = store.create_array(target, i, key, w.shape, w.dtype.name, 1, w.shape[0])
                    wait(arr.write(w), f"writing {target.root}/{layer_name(i)}/{key}")
                    arrays[f"{layer_name(i)}/{key}"] = arr
                    written[f"{layer_name(i)}/{key}"] = hashlib.sha256(w.tobytes()).hexdigest()
        return store.write_manifest(target, "moe_experts", fields, arrays, written)

    def start_read(self, layer: int, expert: int) -> _PendingExpert:
        group = self.arrays[layer]
        keys = [k for n in NAMES for k in stored_names(n, self.dtype)]
        return _PendingExpert(self, layer, {k: group[k][expert].read() for k in keys})


def stored_names(name: str, dtype: str) -> tuple[str, ...]:
    return (name, f"{name}_scales", f"{name}_zeros") if dtype in quant.GROUP_DTYPES else (name,)


def _stored(w: np.ndarray, name: str, dtype: str) -> dict[str, np.ndarray]:
    """The arrays that store weight `name` in `dtype`."""
    if dtype in quant.FLOAT_DTYPES:
        return {name: w.astype(quant.FLOAT_DTYPES[dtype])}
    q = quant.group_quantize(w, dtype)
    return {name: q["codes"], f"{name}_scales": q["scales"], f"{name}_zeros": q["zeros"]}


def expert_bytes(dtype: str, d: int, f: int, gated: bool = False) -> int:
    """Stored bytes of one expert (up [D, F] and down [F, D]; gated: up [D, 2F] holding
    [gate | up]), scales and zeros included."""
    fu = 2 * f if gated else f
    if dtype in quant.FLOAT_DTYPES:
        return (fu + f) * d * np.dtype(quant.FLOAT_DTYPES[dtype]).itemsize
    return d * quant.group_bytes(dtype, fu) + f * quant.group_bytes(dtype, d)


class _PendingExpert:
    def __init__(self, store_: ExpertStore, layer: int, futures):
        self.store, self.layer, self.futures = store_, layer, futures

    def result(self) -> tuple:
        """(up, down): arrays of a float store; {'codes', 'scales', 'zeros'} of a quantised one."""
        try:
            got = {k: f.result() for k, f in self.futures.items()}
        except ValueError as e:
            where = f"{self.store.path}/{layer_name(self.layer)}"
            raise StoreError(f"reading an expert from {where} failed ({store.short(e)})") from None
        if self.store.dtype not in quant.GROUP_DTYPES:
            return tuple(got[n] for n in NAMES)
        return tuple(
            {"codes": got[n], "scales": got[f"{n}_scales"], "zeros": got[f"{n}_zeros"]}
            for n in NAMES
        )
