"""The one store format behind every offloaded-weight store (MoLE LUTs, MoE experts, and any
later quantised store): tensorstore zarr3 arrays grouped by layer, a manifest, checksums,
verification and atomic publishing.

Layout under a store directory:
    manifest.json          written last; a directory without it is not a store
    layer_XX/<array>       zarr3 arrays, first axis the row axis (token ids, expert ids)
Arrays use the `sharding_indexed` codec: shards of `shard_rows` rows, inner chunks of
`rows_per_chunk` rows, no compression, a crc32c checksum on every inner chunk and on every shard
index, so a corrupt byte is reported by the read that touches it. The manifest holds the format
version, the store's kind, the digest of the checkpoint parameters the store was built from
(`params_digest`) and each array's shape, dtype and SHA-256 (`open_arrays(verify=...)`
recomputes them).

A store is written into `.<name>.tmp-<pid>` beside its destination (`staging_dir`), its arrays
read back and compared with digests of what was written (`write_manifest(written=...)`), and
renamed into place (`publish`) only then: a killed writer leaves a temporary directory that the
next writer removes, never a store that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import tensorstore as ts

from mole_jax.errors import StoreError, UserError
from mole_jax.files import write_text_atomic

FORMAT_VERSION = 1
VERIFY_AUTO_BYTES = 256 * 2**20  # `verify='auto'` hashes every array of stores up to this size
KINDS = {"mole_lut": "LUT store", "moe_experts": "expert store"}  # manifest kind -> its name
EXTRA_DTYPES = {"bfloat16": ml_dtypes.bfloat16}  # tensorstore dtype names numpy lacks

Arrays = dict[int, dict[str, ts.TensorStore]]  # {layer: {array name: array}}


def layer_name(layer: int) -> str:
    return f"layer_{layer:02d}"


def array_spec(path: Path, shape, dtype: str, rows_per_chunk: int, shard_rows: int) -> dict:
    chunk = [rows_per_chunk, *shape[1:]]
    shard = [max(rows_per_chunk, shard_rows - shard_rows % rows_per_chunk), *shape[1:]]
    raw_crc = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "store_data_equal_to_fill_value": True,  # every chunk on disk: none missing by design
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shard}},
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": chunk,
                        "codecs": raw_crc,
                        "index_codecs": raw_crc,
                    },
                }
            ],
        },
    }


def create_array(
    store_dir: Path, layer: int, name: str, shape, dtype: str, rows_per_chunk: int, shard_rows: int
) -> ts.TensorStore:
    """A new empty array `layer_XX/<name>` of a store being written."""
    spec = array_spec(
        store_dir / layer_name(layer) / name, shape, dtype, rows_per_chunk, shard_rows
    )
    return ts.open(spec, create=True, delete_existing=True).result()


def staging_dir(final: Path) -> Path:
    """Where a store bound for `final` is written first; what killed writers left goes
    (`_recover_published`)."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    _recover_published(final)
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def check_not_older(final: Path, step: int, chosen: bool) -> None:
    """Refuses to replace a store made from a newer checkpoint step than `step` (the newest
    readable one, when the newest is damaged) unless that step was `chosen` (--step)."""
    try:
        had = json.loads((final / "manifest.json").read_text()).get("checkpoint_step")
    except (OSError, ValueError):
        return
    if not chosen and isinstance(had, int) and had > step:
        raise UserError(
            f"{final} holds step {had}'s export, newer than step {step}, the newest readable "
            f"checkpoint; not replaced (pass --step={step} to replace it, or --out=NAME to "
            "write beside it)"
        )


def _recover_published(final: Path) -> None:
    """A writer killed inside `publish` leaves the replaced store at `.<name>.old-<pid>`: put
    back when nothing took its place (the only complete copy), removed otherwise."""
    for old in sorted(final.parent.glob(f".{final.name}.old-*")):
        if not final.exists() and (old / "manifest.json").is_file():
            os.replace(old, final)
            print(f"warning: {final} was being replaced when its writer stopped; restored it")
        else:
            shutil.rmtree(old, ignore_errors=True)


def publish(tmp: Path, final: Path) -> None:
    """Renames a verified store into place, replacing an older one only after it is complete."""
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_manifest(
    path: Path, kind: str, fields: dict, arrays: Arrays, written: dict[str, str] | None = None
) -> dict:
    """Hashes `arrays` (read back from storage) and writes manifest.json last, atomically.

    `written`: {'layer_XX/name': SHA-256 of the bytes handed to the writes}; a read-back that
    differs raises StoreError and no manifest is written.
    """
    entries = {
        f"{layer_name(layer)}/{name}": dict(
            shape=list(arr.shape), dtype=str(arr.dtype.name), sha256=digest(arr)
        )
        for layer in sorted(arrays)
        for name, arr in arrays[layer].items()
    }
    for name, want in (written or {}).items():
        if entries[name]["sha256"] != want:
            raise StoreError(f"store verification failed for {path}/{name}: read-back differs")
    manifest = dict(
        format_version=FORMAT_VERSION,
        kind=kind,
        all_chunks_stored=True,  # (`array_spec`): a missing chunk is damage, never zeros
        **fields,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        arrays=entries,
    )
    write_text_atomic(path / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


def read_manifest(path: Path, kind: str, expect: dict | None) -> dict:
    """The manifest of a store of `kind`, checked for format and for the `expect`ed fields."""
    mpath = path / "manifest.json"
    what = KINDS[kind]
    if not mpath.is_file():
        raise StoreError(f"no {what} at {path} (manifest.json missing): run `launch.py export`")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{mpath} is corrupt ({e}); re-run `launch.py export`") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or manifest.get("kind") != kind:
        raise StoreError(
            f"{path}: format {manifest.get('kind')} v{version} is not {kind} v{FORMAT_VERSION}"
            "; re-run `launch.py export`"
        )
    if "params_sha256" in manifest:  # written before checkpoint digests were `digest.py`'s
        manifest.setdefault("params_digest", manifest["params_sha256"])
    for key, want in (expect or {}).items():
        if manifest.get(key) != want:
            raise StoreError(
                f"{what} {path} does not match the checkpoint: its {key} is "
                f"{manifest.get(key)!r}, expected {want!r}; re-run `launch.py export`"
            )
    return manifest


def open_arrays(
    path: Path, manifest: dict, verify: str, context: ts.Context | None = None
) -> Arrays:
    """Opens every array the manifest lists (in `context`), checks shapes and dtypes, and with
    verify='full' (or 'auto' and at most VERIFY_AUTO_BYTES in all) their SHA-256 digests."""
    arrays: Arrays = {}
    for name, info in manifest["arrays"].items():
        layer_dir, array = name.split("/")
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / name)}}
        if manifest.get("all_chunks_stored"):  # earlier stores skipped all-zero chunks
            spec["fill_missing_data_reads"] = False
        try:
            arr = ts.open(spec, open=True, context=context or ts.Context()).result()
        except ValueError as e:
            raise StoreError(
                f"array {path}/{name} is missing or unreadable ({short(e)}); re-run export"
            ) from None
        if list(arr.shape) != info["shape"] or arr.dtype.name != info["dtype"]:
            raise StoreError(
                f"array {path}/{name} is {list(arr.shape)} {arr.dtype.name}; the manifest "
                f"says {info['shape']} {info['dtype']}"
            )
        arrays.setdefault(int(layer_dir.removeprefix("layer_")), {})[array] = arr
    total = sum(array_bytes(a) for a in manifest["arrays"].values())
    if verify == "full" or (verify == "auto" and total <= VERIFY_AUTO_BYTES):
        verify_arrays(path, manifest, arrays)
    return arrays


def verify_arrays(path: Path, manifest: dict, arrays: Arrays) -> None:
    for name, info in manifest["arrays"].items():
        layer_dir, array = name.split("/")
        arr = arrays[int(layer_dir.removeprefix("layer_"))][array]
        try:
            got = digest(arr)
        except ValueError as e:  # a crc32c mismatch surfaces as DATA_LOSS
            raise StoreError(f"array {path}/{name} is corrupt ({short(e)}); re-export") from None
        if got != info["sha256"]:
            raise StoreError(f"array {path}/{name} fails its checksum; re-export")


def array_bytes(info: dict) -> int:
    """Stored bytes of a manifest array entry {'shape', 'dtype'}."""
    itemsize = np.dtype(EXTRA_DTYPES.get(info["dtype"], info["dtype"])).itemsize
    return int(np.prod(info["shape"])) * itemsize


def digest(arr: ts.TensorStore, rows: int = 8192) -> str:
    """SHA-256 of an array's bytes, read `rows` rows at a time."""
    h = hashlib.sha256()
    n = arr.shape[0]
    for start in range(0, n, rows):
        h.update(np.ascontiguousarray(arr[start : min(n, start + rows)].read().result()).tobytes())
    return h.hexdigest()


def short(e: Exception) -> str:
    text = str(e).replace("\n", " ")
    return text[:240] + ("..." if len(text) > 240 else "")
