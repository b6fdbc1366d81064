"""Object-storage operations of the store format: one PUT for a manifest, each object's generation
(its ETag) recorded at export and checked on open with conditional requests that move no data,
and the removal of data prefixes no manifest names.

What protects a remote store: a store is only ever read through its manifest, written last in
one PUT after its arrays were read back and checked, so a reader sees the old store or the new
one, never a mixture; an object replaced or deleted after that is refused on open (generation,
when read from the origin that wrote it) or on read (a missing chunk is an error, never zeros).
Two exports to one URL: the manifest PUT is conditional on the manifest the export found when it
began (tensorstore's `if_equal`), atomic on Amazon S3 and GCS; on other S3-compatible endpoints
tensorstore checks with a HEAD and then PUTs, so an export that published in between is caught
but a truly simultaneous one is not. The manifest is read back before old data is removed, and
an export removes only prefixes older than its own.
"""

from __future__ import annotations

import json

import tensorstore as ts

from mole_jax.errors import StoreError
from mole_jax.stores.location import Location, context, short, wait

PREFIX = "data-"  # every data prefix of a remote store starts so: `remove_stale` touches no other


def _open(loc: Location) -> ts.KvStore:
    try:
        return ts.KvStore.open(loc.kvstore(), context=context()).result()
    except ValueError as e:
        raise StoreError(f"cannot open {loc} ({short(e)})") from None


def put(loc: Location, key: str, data: bytes, if_equal: bytes | None = None) -> None:
    """One PUT of `key` under `loc`; with `if_equal`, only if the object's generation is still
    that one (`generation`; a conditional request where the backend has them)."""
    try:
        done = _open(loc).write(key, data, if_equal=if_equal).result()
    except ValueError as e:
        raise StoreError(f"cannot write {loc}/{key} ({short(e)})") from None
    if if_equal is not None and not done.generation:
        raise StoreError(
            f"another export published {loc} while this one ran (its {key} changed); this "
            "export's data is removed, the other one's kept: re-run export if it should win"
        )


def generation(loc: Location, key: str) -> bytes:
    """The object's generation now (tensorstore's token for 'no object' when there is none)."""
    try:
        return _open(loc).read(key, byte_range=slice(0, 0)).result().stamp.generation
    except ValueError as e:
        raise StoreError(f"cannot reach {loc} ({short(e)})") from None


def remove_prefix(loc: Location, prefix: str) -> None:
    """Deletes `prefix/` under `loc` ('0' follows '/'); a failure is a warning (the data is
    unreferenced, and the next export removes it)."""
    if not prefix:
        return
    try:
        _open(loc).delete_range(ts.KvStore.KeyRange(prefix + "/", prefix + "0")).result()
    except (ValueError, StoreError) as e:
        print(f"warning: could not remove {loc}/{prefix}/ ({short(e)}); the next export will")


def published(final: Location, prefix: str) -> bool:
    """Whether the manifest under `final` names `prefix` now (read back after the PUT)."""
    raw = wait(_open(final).read("manifest.json"), f"reading {final}/manifest.json")
    return raw.state == "value" and json.loads(raw.value).get("prefix") == prefix


def _keys(kv: ts.KvStore, loc: Location) -> list[str]:
    return sorted(k.decode() for k in wait(kv.list(), f"listing {loc}"))


def generations(root: Location) -> dict[str, str]:
    """{key: generation (hex)} of every object under `root` (empty-range reads: no data)."""
    kv = _open(root)
    keys = _keys(kv, root)
    reads = [kv.read(k, byte_range=slice(0, 0)) for k in keys]
    got = [wait(r, f"reading {root}/{k}") for k, r in zip(keys, reads, strict=True)]
    return {k: r.stamp.generation.hex() for k, r in zip(keys, got, strict=True)}


def check_generations(root: Location, recorded: dict[str, str]) -> None:
    """Every recorded object is there, unchanged: conditional reads (if the generation differs),
    all in flight at once; an unchanged object answers without data."""
    kv = _open(root)
    reads = {k: kv.read(k, if_not_equal=bytes.fromhex(g), byte_range=slice(0, 0))
             for k, g in recorded.items()}  # fmt: skip
    for key, read in reads.items():
        try:
            got = read.result()
        except ValueError as e:
            raise StoreError(f"cannot reach the store at {root} ({short(e)})") from None
        if got.state == "missing":
            raise StoreError(f"{root}/{key} is missing: the store is damaged; re-run export")
        if got.state == "value":
            raise StoreError(
                f"{root}/{key} was replaced after the export (its generation changed); "
                "re-run export"
            )


def remove_stale(final: Location, keep: str) -> None:
    """Deletes the data prefixes under `final` older than `keep` (names sort by time): no
    manifest names them once `keep`'s manifest is written."""
    try:
        prefixes = {k.split("/", 1)[0] for k in _keys(_open(final), final) if k.startswith(PREFIX)}
    except StoreError as e:
        print(f"warning: old data under {final} not removed ({e}); the next export will")
        return
    for p in sorted(prefixes):
        if p < keep:
            remove_prefix(final, p)
