"""The MoE expert-offloading baseline's store: every routed expert's weights in tensorstore, one
chunk per expert, so loading an expert is one read of 2·D·F values.

Layout under `<workdir>/experts/` (same manifest and checks as the LUT store):
    manifest.json        written last; kind 'moe_experts', params_sha256 of the checkpoint
    layer_XX/up          zarr3 [E, D, F], inner chunk [1, D, F]
    layer_XX/down        zarr3 [E, F, D], inner chunk [1, F, D]
Only float dtypes (float32 / float16 / bfloat16): the baseline moves experts as they are.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorstore as ts

from mole_jax import quant
from mole_jax.errors import StoreError, UserError
from mole_jax.export import restore_model, staging_dir, swap_into_place
from mole_jax.ffn import kind_of_layer
from mole_jax.lut_store import (
    _short,
    array_spec,
    layer_name,
    open_arrays,
    read_manifest,
    write_manifest,
)

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
        manifest = read_manifest(path, "moe_experts", expect)
        return cls(path, manifest, open_arrays(path, manifest, verify))

    def start_read(self, layer: int, expert: int) -> _PendingExpert:
        group = self.arrays[layer]
        return _PendingExpert(self, layer, [group[n][expert].read() for n in NAMES])


class _PendingExpert:
    def __init__(self, store: ExpertStore, layer: int, futures):
        self.store, self.layer, self.futures = store, layer, futures

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        try:
            up, down = (f.result() for f in self.futures)
        except ValueError as e:
            where = f"{self.store.path}/{layer_name(self.layer)}"
            raise StoreError(f"reading an expert from {where} failed ({_short(e)})") from None
        return up, down


def export_experts(
    workdir: str, step: int | None = None, dtype: str = "float32", out: str = "experts"
) -> dict:
    """Writes `<workdir>/<out>/` from a MoE checkpoint (atomically, like the LUT export)."""
    if dtype not in quant.FLOAT_DTYPES:
        raise UserError(f"expert stores hold float32|float16|bfloat16, not --dtype={dtype}")
    cfg, _, params, _, meta = restore_model(workdir, step)
    m = cfg.model
    if m.ffn.kind != "moe":
        raise UserError(f"{workdir} holds a '{m.ffn.kind}' model; only MoE experts are offloaded")
    layers = [i for i in range(m.n_layers) if kind_of_layer(m, i) == "moe"]
    final = Path(workdir) / out
    tmp = staging_dir(final)
    tmp.mkdir(parents=True)
    arrays: dict[int, dict[str, ts.TensorStore]] = {}
    np_dtype = quant.FLOAT_DTYPES[dtype]
    for i in layers:
        arrays[i] = {}
        for name in NAMES:
            w = np.asarray(params["blocks"][i]["ffn"][name]).astype(np_dtype)
            spec = array_spec(tmp / layer_name(i) / name, w.shape, dtype, 1, w.shape[0])
            arrays[i][name] = ts.open(spec, create=True, delete_existing=True).result()
            arrays[i][name].write(w).result()
    c = m.ffn.moe
    fields = dict(
        checkpoint_step=int(meta["step"]),
        params_sha256=meta["params_sha256"],
        dtype=dtype,
        layers=layers,
        experts=c.experts,
        d_model=m.d_model,
        d_expert=c.d_expert,
        bytes_per_expert=2 * m.d_model * c.d_expert * np.dtype(np_dtype).itemsize,
    )
    manifest = write_manifest(tmp, "moe_experts", fields, arrays)
    swap_into_place(tmp, final)
    return manifest
