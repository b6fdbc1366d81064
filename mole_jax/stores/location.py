"""Where a store lives: a local folder or an object-storage URL, and how tensorstore reaches it.

    /path/to/store, file:///path      a folder (written through a staging folder and a rename)
    s3://bucket/prefix                Amazon S3 or any S3-compatible server
    gs://bucket/prefix                Google Cloud Storage
    http(s)://host/prefix             read-only (a server that answers Range requests)

What a URL cannot carry comes from the environment, read here and nowhere else:

    AWS_ENDPOINT_URL (or MOLE_JAX_S3_ENDPOINT)   an S3-compatible endpoint (the AWS SDKs' own
                                                 variable, which tensorstore ignores)
    AWS_REGION / AWS_DEFAULT_REGION              the bucket's region (us-east-1 when unset and an
                                                 endpoint is given)
    AWS_ACCESS_KEY_ID, AWS_PROFILE, ...          credentials: the environment's keys, else the
                                                 named profile, else the default chain
    MOLE_JAX_STORE_RETRIES                       retries of one request (default 2), so an
                                                 unreachable store fails within seconds
    MOLE_JAX_STORE_CONCURRENCY                   requests in flight at once (default 32)

Credentials come only through the standard chains (environment, profile, instance metadata):
never in a spec or a URL, never in a message; `redact` removes a URL's user, password and query
from any text that leaves this package.
"""

from __future__ import annotations

import dataclasses
import os
import re
import urllib.parse
from pathlib import Path

import tensorstore as ts

from mole_jax.errors import StoreError, UserError

SCHEMES = ("file", "s3", "gs", "http", "https")
# user:password@ may hold '/' (AWS secret keys do): everything up to the last '@' of the word
_URL = re.compile(r"\b([a-z][a-z0-9+.-]*://)([^@\s]*@)?([^\s?#]*)(\?[^\s#]*)?", re.I)


def redact(text: str) -> str:
    """`text` with every URL's credentials (user:password@) and query (?signature=...) removed."""
    return _URL.sub(
        lambda m: m.group(1) + ("***@" if m.group(2) else "") + m.group(3)
        + ("?***" if m.group(4) else ""), text
    )  # fmt: skip


def short(e: Exception) -> str:
    """An error's text on one line, at most 240 characters, with URL credentials redacted."""
    text = redact(str(e).replace("\n", " "))
    return text[:240] + ("..." if len(text) > 240 else "")


def is_url(value) -> bool:
    return isinstance(value, str) and "://" in value


@dataclasses.dataclass(frozen=True)
class Location:
    """A store's root: `scheme` and, for object storage, `bucket` and `path` (no slashes at
    either end); for a folder, `path` is absolute."""

    scheme: str
    bucket: str
    path: str

    @property
    def remote(self) -> bool:
        return self.scheme != "file"

    @property
    def writable(self) -> bool:
        return self.scheme not in ("http", "https")

    @property
    def local_path(self) -> Path:
        if self.remote:
            raise UserError(f"{self} is not a local folder")
        return Path(self.path)

    def __fspath__(self) -> str:
        """A folder's path (so `Path(location)` works for local stores); object storage has none."""
        if self.remote:
            raise TypeError(f"{self} is object storage, not a local folder")
        return self.path

    @property
    def origin(self) -> str:
        """Who serves the objects (scheme, bucket or host, S3 endpoint): object generations are
        only comparable within one origin."""
        endpoint = s3_options().get("endpoint", "") if self.scheme == "s3" else ""
        return f"{self.scheme}://{self.bucket}{' ' + endpoint if endpoint else ''}"

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def __str__(self) -> str:
        if not self.remote:
            return self.path
        return redact(f"{self.scheme}://{self.bucket}/{self.path}".rstrip("/"))

    def join(self, *parts: str) -> Location:
        tail = "/".join(p.strip("/") for p in parts if p)
        if not tail:
            return self
        if not self.remote:
            return Location("file", "", str(Path(self.path, tail)))
        return Location(self.scheme, self.bucket, f"{self.path}/{tail}".strip("/"))

    def kvstore(self, *parts: str) -> dict:
        """The tensorstore kvstore spec of `parts` under this location (a folder's path ends
        with '/', as tensorstore's directory-like kvstores expect)."""
        loc = self.join(*parts)
        path = loc.path.strip("/")
        path = (path + "/" if path else "") if loc.remote else loc.path.rstrip("/") + "/"
        if loc.scheme == "file":
            return {"driver": "file", "path": path}
        if loc.scheme in ("http", "https"):
            return {
                "driver": "http",
                "base_url": f"{loc.scheme}://{loc.bucket}",
                "path": "/" + path,
            }
        spec = {"driver": loc.scheme if loc.scheme == "s3" else "gcs", "bucket": loc.bucket}
        spec["path"] = path
        if loc.scheme == "s3":
            spec.update(s3_options())
        return spec

    def exists(self) -> bool:
        """Whether a manifest is there (any error reaching the store propagates)."""
        return read_key(self, "manifest.json") is not None


def location(value: str | os.PathLike | Location) -> Location:
    """A store location from a URL or a path."""
    if isinstance(value, Location):
        return value
    text = os.fspath(value)
    if not is_url(text):
        return Location("file", "", str(Path(text).absolute()))
    url = urllib.parse.urlsplit(text)
    scheme = url.scheme.lower()
    if scheme not in SCHEMES:
        raise UserError(f"{redact(text)}: a store URL is {'|'.join(s + '://' for s in SCHEMES)}")
    if "@" in text:  # user:password@ (a secret may hold '/', so anywhere in the URL)
        raise UserError(f"{scheme}://...: credentials do not go in a store URL, and a store URL "
                        "has no '@' (use the environment or a profile)")  # fmt: skip
    if scheme == "file":
        return Location("file", "", str(Path(urllib.parse.unquote(url.path)).absolute()))
    if not url.hostname or url.query:
        raise UserError(f"{redact(text)}: expected {scheme}://HOST/PATH, no query")
    return Location(scheme, url.netloc, url.path.strip("/"))  # (a bucket keeps its case)


def s3_options() -> dict:
    """Endpoint and region from the environment (module docstring)."""
    out = {}
    endpoint = os.environ.get("MOLE_JAX_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if endpoint:
        out["endpoint"] = endpoint
    if region or endpoint:
        out["aws_region"] = region or "us-east-1"
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        out["aws_credentials"] = {"type": "environment"}  # (the chain's first link, taken alone:
        # the whole chain logs every file and service it found nothing in)
    elif os.environ.get("AWS_PROFILE"):  # tensorstore's chain reads ~/.aws only when named
        out["aws_credentials"] = {"type": "default", "profile": os.environ["AWS_PROFILE"]}
    return out


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise UserError(f"{name}={raw!r}: expected an integer") from None


def context(extra: dict | None = None) -> ts.Context:
    """A tensorstore context with capped retries and bounded concurrency for every driver."""
    retries = {"max_retries": _int_env("MOLE_JAX_STORE_RETRIES", 2),
               "initial_delay": "50ms", "max_delay": "1s"}  # fmt: skip
    limit = {"limit": _int_env("MOLE_JAX_STORE_CONCURRENCY", 32)}
    spec = {
        "s3_request_retries": retries,
        "gcs_request_retries": retries,
        "http_request_retries": retries,
        "s3_request_concurrency": limit,
        "gcs_request_concurrency": limit,
        "http_request_concurrency": limit,
        **(extra or {}),
    }
    return ts.Context(spec)


def wait(future, what: str):
    """A tensorstore future's result; its failure is one StoreError line naming `what`."""
    try:
        return future.result()
    except ValueError as e:
        raise StoreError(f"{what} failed ({short(e)})") from None


def read_key(loc: Location, key: str) -> bytes | None:
    """The bytes of `key` under `loc`, None when it is absent."""
    kv = ts.KvStore.open(loc.kvstore(), context=context()).result()
    got = kv.read(key).result()
    return bytes(got.value) if got.state == "value" else None


DRIVERS = ("file", "s3", "gcs", "http")  # the storage drivers (not adapters such as sharding)


def io_counters() -> tuple[int, int]:
    """(read requests, bytes read) through every storage driver since the process started:
    tensorstore's own metrics, exact for folders, S3, GCS and HTTP alike (socket reads included,
    which /proc/self/io does not count)."""
    requests = nbytes = 0
    for metric in ts.experimental_collect_matching_metrics("/tensorstore/kvstore/"):
        parts = metric["name"].strip("/").split("/")
        if len(parts) != 4 or parts[2] not in DRIVERS:
            continue
        value = sum(v.get("value", 0) for v in metric["values"])
        if parts[3] == "batch_read":  # requests made (`read` counts reads asked, some merged)
            requests += value
        elif parts[3] == "bytes_read":
            nbytes += value
    return int(requests), int(nbytes)


def io_since(start: tuple[int, int]) -> tuple[int, int]:
    """(requests, bytes) read since `start`, an earlier `io_counters()`."""
    now = io_counters()
    return now[0] - start[0], now[1] - start[1]
