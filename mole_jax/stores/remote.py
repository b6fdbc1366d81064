"""Object-storage operations of the store format: one PUT for a manifest, each object's generation
(its ETag) recorded at export and checked on open with conditional requests that move no data,
and the removal of data prefixes no manifest names.

What protects a remote store: a store is only ever read through its manifest, written last in
one PUT after its arrays were read back and checked, so a reader sees the old store or the new
one, never a mixture; an object replaced or deleted after that is refused on open (generation)
or on read (a missing chunk is an error, never zeros). Two exports to the same URL at once are
refused where the backend honours conditional writes (S3, GCS): an export's manifest PUT is
conditional on the manifest it found when it started, so the second of two concurrent exports
fails in one line and removes its own data; each export removes only prefixes older than its
own.
"""

from __future__ import annotations

import tensorstore as ts

from mole_jax.errors import StoreError
from mole_jax.stores.location import Location, context, short

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
    _open(loc).delete_range(ts.KvStore.KeyRange(prefix + "/", prefix + "0")).result()


def _keys(kv: ts.KvStore) -> list[str]:
    return sorted(k.decode() for k in kv.list().result())


def generations(root: Location) -> dict[str, str]:
    """{key: generation (hex)} of every object under `root`, from one-byte range reads."""
    kv = _open(root)
    keys = _keys(kv)
    reads = [kv.read(k, byte_range=slice(0, 1)) for k in keys]
    return {k: r.result().stamp.generation.hex() for k, r in zip(keys, reads, strict=True)}


def check_generations(root: Location, recorded: dict[str, str]) -> None:
    """Every recorded object is there, unchanged: conditional reads (if the generation differs),
    all in flight at once; an unchanged object answers without data."""
    kv = _open(root)
    reads = {k: kv.read(k, if_not_equal=bytes.fromhex(g)) for k, g in recorded.items()}
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
    kv = _open(final)
    prefixes = {k.split("/", 1)[0] for k in _keys(kv) if k.startswith(PREFIX)}
    for p in sorted(prefixes):
        if p < keep:
            remove_prefix(final, p)
