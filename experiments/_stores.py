"""What the offload benchmarks share: a store that names the newest checkpoint, exported if not."""

from __future__ import annotations

import os

from mole_jax.errors import StoreError
from mole_jax.train.checkpoint import Checkpointer, params_id


def fresh(store_cls, workdir: str, name: str, export) -> None:
    """Calls export() unless `<workdir>/<name>` opens and names the newest checkpoint's
    parameters."""
    ckpt = Checkpointer(workdir)
    digest = params_id(ckpt.meta())
    ckpt.close()
    try:
        store_cls.open(os.path.join(workdir, name), expect={"params_digest": digest})
    except StoreError:
        print(f"exporting {workdir}/{name}", flush=True)
        export()


def drop_page_cache(path) -> None:
    """Asks the OS to drop the cached pages of every file under `path`
    (posix_fadvise(POSIX_FADV_DONTNEED)): the next reads come from the disk."""
    from pathlib import Path

    for f in Path(path).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
