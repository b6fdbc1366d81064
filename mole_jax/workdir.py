"""The layout of a run directory, its config loaded once, and its writer lock.

W/config.json          the resolved config (export / eval / generate read it)
W/tokenizer.json       the run's tokenizer
W/checksums.json       SHA-256 of config.json and tokenizer.json, checked when they are read
W/model_summary.json   accounting (accounting.summarize)
W/metrics.jsonl, W/tb/ training curves
W/checkpoints/<step>/  orbax checkpoints (checkpoint.py)
W/<store>/             LUT stores (`lut`, `lut_nf4`, ...) and expert stores (`experts`, ...)
W/eval/<name>.json     evaluation results
W/.lock                held (fcntl) by the one process allowed to write the workdir
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
from pathlib import Path

import ml_collections

from mole_jax.config import from_dict, to_json
from mole_jax.errors import ConfigError, UserError
from mole_jax.files import write_text_atomic


class Workdir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"

    @property
    def summary_path(self) -> Path:
        return self.path / "model_summary.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def tb_dir(self) -> Path:
        return self.path / "tb"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    def store(self, name: str) -> Path | str:
        """A LUT or expert store: a name under the workdir ('lut', 'lut_nf4', 'experts', ...),
        or a folder (a path with a '/') or a URL (s3://, gs://, http(s)://) anywhere."""
        if "://" in name:
            return name
        return Path(name) if "/" in name else self.path / name

    def eval_path(self, name: str) -> Path:
        return self.path / "eval" / f"{name}.json"

    def has_checkpoints(self) -> bool:
        d = self.checkpoints_dir
        return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())

    @functools.cached_property
    def config(self) -> ml_collections.FrozenConfigDict:
        """The resolved config `train` wrote (read once; frozen: use `editable_config` to vary
        it)."""
        path = self.config_path
        if not path.exists():
            raise ConfigError(
                f"{path} not found: is '{self.path}' a workdir written by `launch.py train`?"
            )
        self._check(path)
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"{path} is not valid JSON ({e}); re-run train to rewrite it"
            ) from None
        return ml_collections.FrozenConfigDict(from_dict(raw))

    def editable_config(self) -> ml_collections.ConfigDict:
        """A mutable copy of `config`."""
        return from_dict(json.loads(to_json(self.config)))

    def tokenizer(self):
        """The run's tokenizer, checked against `checksums.json` before it is read."""
        from tokenizers import Tokenizer

        if not self.tokenizer_path.exists():
            raise UserError(
                f"{self.tokenizer_path} is missing: is '{self.path}' a workdir written by "
                "`launch.py train`?"
            )
        self._check(self.tokenizer_path)
        try:
            return Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise UserError(f"{self.tokenizer_path} is not a tokenizers JSON file ({e})") from None

    def save_config(self, cfg: ml_collections.ConfigDict) -> None:
        self.write_checked(self.config_path, to_json(cfg))
        self.__dict__.pop("config", None)

    def write_checked(self, path: Path, text: str) -> None:
        """Writes one of the workdir's text files atomically and records its SHA-256. A damaged
        checksums.json is replaced (only `train` writes these files, after checking its config
        against the checkpoints; it writes config.json and tokenizer.json both)."""
        write_text_atomic(path, text)
        try:
            sums = self._checksums() or {}
        except ConfigError:
            sums = {}
        sums[path.name] = hashlib.sha256(text.encode()).hexdigest()
        write_text_atomic(self.checksums_path, json.dumps(sums, indent=2))

    @property
    def checksums_path(self) -> Path:
        return self.path / "checksums.json"

    def _checksums(self) -> dict[str, str] | None:
        """The recorded SHA-256s, or None where there is no checksums.json (a workdir written
        before checksums existed). A checksums.json that cannot be read is refused: verification
        is never switched off by a damaged file."""
        path = self.checksums_path
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise self._damaged(f"cannot be read: {e.strerror}") from None
        try:
            sums = json.loads(raw.decode())
        except UnicodeDecodeError:
            raise self._damaged("not UTF-8 text") from None
        except ValueError as e:
            why = "empty" if not raw.strip() else f"not valid JSON: {e}"
            raise self._damaged(why) from None
        if not isinstance(sums, dict) or not all(
            isinstance(v, str) and len(v) == 64 and set(v) <= set("0123456789abcdef")
            for v in sums.values()
        ):
            raise self._damaged("not a map of file names to SHA-256 digests")
        return sums

    def _damaged(self, why: str, what: str = "config.json and tokenizer.json") -> ConfigError:
        return ConfigError(
            f"{self.checksums_path} is damaged ({why}), so {what} cannot be verified; restore "
            f"it, or re-run `launch.py train --config=<the run's config> --workdir={self.path}` "
            "(the checkpoints must match that config) to write it again, or delete it to "
            "accept config.json and tokenizer.json as they are"
        )

    def _check(self, path: Path) -> None:
        """A file whose bytes differ from the SHA-256 recorded when it was written is refused,
        and so is one without a record in a checksums.json (train records both files). Workdirs
        written before checksums existed carry no checksums.json, and are not checked."""
        sums = self._checksums()
        if sums is None:
            return
        want = sums.get(path.name)
        if want is None:
            raise self._damaged(f"no entry for {path.name}", path.name)
        if hashlib.sha256(path.read_bytes()).hexdigest() != want:
            raise ConfigError(
                f"{path} fails its checksum (it or {self.checksums_path.name} changed or is "
                "corrupt); re-run `launch.py train` with the run's config to rewrite it"
            )

    @contextlib.contextmanager
    def writer_lock(self, command: str):
        """Holds the workdir's lock while `command` writes it. A second writer is refused in one
        line naming the holder's pid; the kernel releases the lock when its process dies."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                raise UserError(
                    f"{self.path} is in use by another writer ({holder}); wait for it to finish "
                    "or use another --workdir"
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()}, {command}".encode(), 0)
            yield self
        finally:
            os.close(fd)  # closing the descriptor releases the lock


def as_workdir(workdir: str | os.PathLike | Workdir) -> Workdir:
    return workdir if isinstance(workdir, Workdir) else Workdir(workdir)
