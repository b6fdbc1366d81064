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
import uuid
from pathlib import Path

import ml_dtypes
import numpy as np
import tensorstore as ts

from mole_jax.errors import StoreError, UserError
from mole_jax.files import write_text_atomic
from mole_jax.stores import remote
from mole_jax.stores.location import Location, context, location, read_key, short

FORMAT_VERSION = 1
VERIFY_AUTO_BYTES = 256 * 2**20  # `verify='auto'` hashes every array of stores up to this size
KINDS = {"mole_lut": "LUT store", "moe_experts": "expert store"}  # manifest kind -> its name
EXTRA_DTYPES = {"bfloat16": ml_dtypes.bfloat16}  # tensorstore dtype names numpy lacks


def layer_name(layer: int) -> str:
    return f"layer_{layer:02d}"


def array_spec(root: Location, name: str, shape, dtype: str, rows_per_chunk: int, shard_rows: int):
    chunk = [rows_per_chunk, *shape[1:]]
    shard = [max(rows_per_chunk, shard_rows - shard_rows % rows_per_chunk), *shape[1:]]
    raw_crc = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
    return {
        "driver": "zarr3",
        "kvstore": root.kvstore(name),
        "store_data_equal_to_fill_value": True,  # every chunk stored: none missing by design
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


class Staging:
    """Where a store bound for `final` is written and how it is published.

    A folder: arrays and manifest go to `.<name>.tmp-<pid>` beside it (what killed writers left
    is removed first, `_recover_published`), renamed into place by `publish`. Object storage has
    no rename: arrays go under a fresh, never-reused prefix `data-<time>-<random>/` of the store,
    the manifest (naming that prefix and every object's generation) is written last, in one PUT
    conditional on the manifest found at the start (`remote.py`), and `publish` then removes the
    prefixes no manifest names. `Staging.at(root)` writes in
    place (tests, scratch stores)."""

    def __init__(self, final: Location, root: Location, prefix: str = "", tmp: Path | None = None):
        self.final, self.root, self.prefix, self.tmp = final, root, prefix, tmp
        self.found: bytes | None = None  # remote: the manifest's generation when export began

    @classmethod
    def at(cls, root) -> Staging:
        if isinstance(root, Staging):
            return root
        loc = location(root)
        return cls(loc, loc)

    @classmethod
    def begin(cls, final: Location) -> Staging:
        if not final.writable:
            raise UserError(f"{final}: an http(s) store is read-only; export to a folder, s3:// "
                            "or gs:// and serve that")  # fmt: skip
        if final.remote:
            prefix = f"{remote.PREFIX}{_stamp()}-{uuid.uuid4().hex[:8]}"
            staging = cls(final, final.join(prefix), prefix)
            staging.found = remote.generation(final, "manifest.json")
            return staging
        tmp = staging_dir(final.local_path)
        return cls(final, location(tmp), tmp=tmp)

    @property
    def manifest_dir(self) -> Location:
        return self.final if self.prefix else self.root

    def publish(self) -> None:
        if self.tmp is not None:
            publish(self.tmp, self.final.local_path)
        elif self.prefix:
            remote.remove_stale(self.final, keep=self.prefix)


def _stamp() -> str:
    """UTC time to the microsecond: data prefixes sort by creation even within one second (an
    export removes only prefixes that sort before its own)."""
    ns = time.time_ns()
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(ns // 10**9)) + f".{ns // 1000 % 10**6:06d}"


def create_array(
    target: Staging, layer: int | None, name: str, shape, dtype: str, rows_per_chunk: int,
    shard_rows: int,
) -> ts.TensorStore:  # fmt: skip
    """A new empty array `layer_XX/<name>` (or `<name>` when `layer` is None) of a store being
    written."""
    key = name if layer is None else f"{layer_name(layer)}/{name}"
    spec = array_spec(target.root, key, shape, dtype, rows_per_chunk, shard_rows)
    try:
        return ts.open(spec, create=True, delete_existing=True, context=context()).result()
    except ValueError as e:
        raise StoreError(f"cannot write {target.root}/{key} ({short(e)})") from None


def staging_dir(final: Path) -> Path:
    """Where a store bound for `final` is written first; what killed writers left goes
    (`_recover_published`)."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    _recover_published(final)
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def check_not_older(final: Location, step: int, chosen: bool) -> None:
    """Refuses to replace a store made from a newer checkpoint step than `step` (the newest
    readable one, when the newest is damaged) unless that step was `chosen` (--step)."""
    try:
        had = json.loads(read_key(final, "manifest.json") or b"{}").get("checkpoint_step")
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
    target: Staging, kind: str, fields: dict, arrays: dict[str, ts.TensorStore],
    written: dict[str, str] | None = None,
) -> dict:  # fmt: skip
    """Hashes `arrays` ({manifest name: array}, read back from storage) and writes manifest.json
    last (atomically: a rename in a folder, one PUT in object storage).

    `written`: {name: SHA-256 of the bytes handed to the writes}; a read-back that differs
    raises StoreError and no manifest is written.
    """
    try:
        entries = {
            name: dict(shape=list(arr.shape), dtype=str(arr.dtype.name), sha256=digest(arr))
            for name, arr in sorted(arrays.items())
        }
    except ValueError as e:
        raise StoreError(f"reading back {target.root} failed ({short(e)})") from None
    for name, want in (written or {}).items():
        if entries[name]["sha256"] != want:
            raise StoreError(
                f"store verification failed for {target.root}/{name}: read-back differs"
            )
    manifest = dict(
        format_version=FORMAT_VERSION,
        kind=kind,
        all_chunks_stored=True,  # (`array_spec`): a missing chunk is damage, never zeros
        **fields,
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        arrays=entries,
    )
    if target.prefix:
        manifest.update(prefix=target.prefix, generations_of=target.final.origin,
                        generations=remote.generations(target.root))  # fmt: skip
    text = json.dumps(manifest, indent=2)
    if target.manifest_dir.remote:
        try:
            remote.put(target.manifest_dir, "manifest.json", text.encode(), target.found)
            if target.prefix and not remote.published(target.final, target.prefix):
                raise StoreError(
                    f"another export published {target.final} at the same time; this one's "
                    "data is removed: re-run export if it should win"
                )
        except StoreError:
            remote.remove_prefix(target.final, target.prefix)
            raise
    else:
        write_text_atomic(target.manifest_dir.local_path / "manifest.json", text)
    return manifest


def read_manifest(loc, kind: str, expect: dict | None) -> dict:
    """The manifest of a store of `kind`, checked for format and for the `expect`ed fields."""
    loc = location(loc)
    what = KINDS[kind]
    try:
        raw = read_key(loc, "manifest.json")
    except ValueError as e:
        hint = "; check the credentials" if loc.remote and "PERMISSION_DENIED" in str(e) else ""
        verb = "reach" if loc.remote else "read"
        raise StoreError(f"cannot {verb} the {what} at {loc} ({short(e)}){hint}") from None
    if raw is None:
        raise StoreError(f"no {what} at {loc} (manifest.json missing): run `launch.py export`")
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(
            f"{loc}/manifest.json is corrupt ({e}); re-run `launch.py export`"
        ) from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or manifest.get("kind") != kind:
        raise StoreError(
            f"{loc}: format {manifest.get('kind')} v{version} is not {kind} v{FORMAT_VERSION}"
            "; re-run `launch.py export`"
        )
    if "params_sha256" in manifest:  # written before checkpoint digests were `digest.py`'s
        manifest.setdefault("params_digest", manifest["params_sha256"])
    for key, want in (expect or {}).items():
        if manifest.get(key) != want:
            raise StoreError(
                f"{what} {loc} does not match the checkpoint: its {key} is "
                f"{manifest.get(key)!r}, expected {want!r}; re-run `launch.py export`"
            )
    return manifest


def open_arrays(loc, manifest: dict, verify: str, cache: dict | None = None) -> dict:
    """Opens every array the manifest lists ({name: array}, in one context with the retry and
    concurrency limits of `location.context` and `cache`), checks shapes and dtypes, and with
    verify='full' (or 'auto' and at most VERIFY_AUTO_BYTES in a folder) their SHA-256 digests.
    A remote store's objects are checked against the generations its manifest recorded, by
    conditional requests that move no data."""
    loc = location(loc)
    root = loc.join(manifest.get("prefix", ""))
    # generations compare within the origin that wrote them (a copy elsewhere has its own)
    checked = bool(manifest.get("generations")) and manifest.get("generations_of") == loc.origin
    if checked:
        remote.check_generations(root, manifest["generations"])
    ctx, arrays = context(cache), {}
    for name, info in manifest["arrays"].items():
        spec = {"driver": "zarr3", "kvstore": root.kvstore(name)}
        if manifest.get("all_chunks_stored"):  # earlier stores skipped all-zero chunks
            spec["fill_missing_data_reads"] = False
        if loc.remote:  # a cached shard index is not revalidated (a round trip per read): an
            # object replaced under it fails its chunks' crc32c, and on open the generations
            # (where they were checked) refuse it first
            spec["recheck_cached_data"] = False
        try:
            arr = ts.open(spec, open=True, context=ctx).result()
        except ValueError as e:
            raise StoreError(
                f"array {loc}/{name} is missing or unreadable ({short(e)}); re-run export"
            ) from None
        if list(arr.shape) != info["shape"] or arr.dtype.name != info["dtype"]:
            raise StoreError(
                f"array {loc}/{name} is {list(arr.shape)} {arr.dtype.name}; the manifest "
                f"says {info['shape']} {info['dtype']}"
            )
        arrays[name] = arr
    total = sum(array_bytes(a) for a in manifest["arrays"].values())
    if verify == "full" or (verify == "auto" and not loc.remote and total <= VERIFY_AUTO_BYTES):
        verify_arrays(loc, manifest, arrays)
    return arrays


def by_layer(arrays: dict[str, ts.TensorStore]) -> dict[int, dict[str, ts.TensorStore]]:
    """{'layer_XX/name': array} -> {XX: {name: array}}."""
    out: dict[int, dict[str, ts.TensorStore]] = {}
    for name, arr in arrays.items():
        layer_dir, array = name.split("/")
        out.setdefault(int(layer_dir.removeprefix("layer_")), {})[array] = arr
    return out


def verify_arrays(loc: Location, manifest: dict, arrays: dict[str, ts.TensorStore]) -> None:
    for name, info in manifest["arrays"].items():
        try:
            got = digest(arrays[name])
        except ValueError as e:  # a crc32c mismatch surfaces as DATA_LOSS
            raise StoreError(f"array {loc}/{name} is corrupt ({short(e)}); re-export") from None
        if got != info["sha256"]:
            raise StoreError(f"array {loc}/{name} fails its checksum; re-export")


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
