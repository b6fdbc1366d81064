"""Read-only checks of the fault campaign (experiments/faults.py): does an artefact still verify?"""

from __future__ import annotations

import sys
from pathlib import Path


def campaign_module(b):
    """The module that defined the campaign base `b` (faults, or __main__ when faults.py runs
    as a script): where the later kinds take `launch` and `_outcome` from, never importing
    faults.py (which imports them to register them)."""
    return sys.modules[type(b).__module__]


def curve(w: Path) -> dict[int, float]:
    from mole_jax.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(str(w)) if "loss" in r}


def verified_checkpoints(w: Path) -> set[int]:
    """The checkpoint steps that restore whole, with their digests (read only: nothing moved)."""
    from mole_jax.errors import CheckpointError, ConfigError
    from mole_jax.train.checkpoint import Checkpointer
    from mole_jax.train.trainer import setup
    from mole_jax.workdir import Workdir

    try:
        tr = setup(Workdir(w).editable_config())
    except ConfigError:  # its config.json is unreadable: nothing can be verified
        return set()
    ckpt, good = Checkpointer(w), set()
    try:
        for step in ckpt.steps():
            try:
                ckpt.restore(tr.abstract_state, step=step)
                good.add(step)
            except CheckpointError:
                pass
    finally:
        ckpt.close()
    return good


def store_ok(w: Path, name: str) -> bool:
    """Whether a store opens with every checksum verified."""
    from mole_jax.errors import StoreError
    from mole_jax.stores import store

    kind = "moe_experts" if name.startswith("experts") else "mole_lut"
    try:
        store.open_arrays(w / name, store.read_manifest(w / name, kind, None), "full")
        return True
    except StoreError:
        return False
