"""The MoE expert-offloading baseline's store (the `store.py` format, kind 'moe_experts'): every
routed expert's weights, one chunk per expert, so loading an expert is one read of 2·D·F values.

    layer_XX/up          zarr3 [E, D, F], inner chunk [1, D, F]
    layer_XX/down        zarr3 [E, F, D], inner chunk [1, F, D]
Only float dtypes (float32 / float16 / bfloat16): the baseline moves experts as they are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import tensorstore as ts

from mole_jax import quant, store
from mole_jax.errors import StoreError
from mole_jax.store import layer_name

NAMES = ("up", "down")


class ExpertStore:
    """`start_read(layer, e)` starts reading one expert; `.result()` is (up [D,F], down [F,D])."""

    def __init__(self, path: Path, manifest: dict, arrays: dict[int, dict[str, ts.TensorStore]]):
        self.path, self.manifest, self.arrays = path, manifest, arrays
        self.layers = tuple(sorted(arrays))
        self.dtype = manifest["dtype"]
        self.expert_bytes = manifest["bytes_per_expert"]

    @classmethod
    def open(cls, path, expect: dict | None = None, verify: str = "auto") -> ExpertStore:
        path = Path(path)
        manifest = store.read_manifest(path, "moe_experts", expect)
        return cls(path, manifest, store.open_arrays(path, manifest, verify))

    @staticmethod
    def write(path: Path, experts: dict[int, dict[str, np.ndarray]], dtype: str, fields: dict):
        """Writes {layer: {'up': [E, D, F], 'down': [E, F, D]}} in `dtype` and the manifest
        (with `fields`) into `path`, read back against what was written. Returns the manifest."""
        np_dtype = quant.FLOAT_DTYPES[dtype]
        arrays, written = {}, {}
        for i, weights in experts.items():
            arrays[i] = {}
            for name in NAMES:
                w = np.ascontiguousarray(np.asarray(weights[name]).astype(np_dtype))
                arr = store.create_array(path, i, name, w.shape, dtype, 1, w.shape[0])
                arr.write(w).result()
                arrays[i][name] = arr
                written[f"{layer_name(i)}/{name}"] = hashlib.sha256(w.tobytes()).hexdigest()
        return store.write_manifest(path, "moe_experts", fields, arrays, written)

    def start_read(self, layer: int, expert: int) -> _PendingExpert:
        group = self.arrays[layer]
        return _PendingExpert(self, layer, [group[n][expert].read() for n in NAMES])


class _PendingExpert:
    def __init__(self, store_: ExpertStore, layer: int, futures):
        self.store, self.layer, self.futures = store_, layer, futures

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            up, down = (f.result() for f in self.futures)
        except ValueError as e:
            where = f"{self.store.path}/{layer_name(self.layer)}"
            raise StoreError(f"reading an expert from {where} failed ({store.short(e)})") from None
        return up, down
