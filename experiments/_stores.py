"""What the offload benchmarks share: a store that names the newest checkpoint, exported if not."""

from __future__ import annotations

import os

from mole_jax.checkpoint import Checkpointer, params_id
from mole_jax.errors import StoreError


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
