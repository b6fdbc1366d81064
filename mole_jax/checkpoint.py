"""Orbax checkpoints of the train state: async saves, keep-K, resume from the newest good step.

Each step directory holds three items: `params`, `train` (optimiser state, step, non-param model
state) and `meta` (JSON: step and the SHA-256 of the parameters). A step whose files are missing,
truncated or whose parameters no longer match their digest is reported in one line and skipped in
favour of the previous one.
"""

from __future__ import annotations

import hashlib
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from mole_jax.errors import CheckpointError

log = logging.getLogger(__name__)


def params_digest(params) -> str:
    """SHA-256 over the parameter bytes in tree order; identifies the exact weights."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        h.update(jax.tree_util.keystr(path).encode())
        h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, use_async: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=use_async, create=True
        )
        self.mgr = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.mgr.all_steps())

    def save(self, state: dict) -> None:
        """Saves {'step', 'params', 'opt_state', 'rest'} at state['step'] (async when enabled)."""
        step = int(state["step"])
        train = {k: v for k, v in state.items() if k != "params"}
        meta = {"step": step, "params_sha256": params_digest(state["params"])}
        self.mgr.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state["params"]),
                train=ocp.args.StandardSave(train),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def _restore_step(self, step: int, like: dict, params_only: bool):
        items = {"params": ocp.args.StandardRestore(_abstract(like["params"]))}
        items["meta"] = ocp.args.JsonRestore()
        if not params_only:
            train = {k: v for k, v in like.items() if k != "params"}
            items["train"] = ocp.args.StandardRestore(_abstract(train))
        got = self.mgr.restore(step, args=ocp.args.Composite(**items))
        if params_digest(got["params"]) != got["meta"]["params_sha256"]:
            raise ValueError("parameter bytes do not match the digest saved with them")
        if params_only:
            return got["params"], got["meta"]
        return {"params": got["params"], **got["train"]}, got["meta"]

    def restore(self, like: dict, step: int | None = None, params_only: bool = False):
        """(state or params, meta) of `step`, or of the newest readable step; None if there is none.

        `like` is a state (or {'params': ...}) with the target structure, shapes and dtypes.
        """
        candidates = [step] if step is not None else self.steps()[::-1]
        if step is not None and step not in self.steps():
            raise CheckpointError(
                f"no checkpoint at step {step} in {self.directory} ({self.steps()})"
            )
        for s in candidates:
            try:
                return self._restore_step(s, like, params_only)
            except Exception as e:  # noqa: BLE001 - any failure to read means "unusable"
                msg = f"checkpoint {self.directory}/{s} is unreadable or corrupt ({_short(e)})"
                if step is not None:
                    raise CheckpointError(msg) from None
                log.warning("%s; falling back to the previous one", msg)
                print(f"warning: {msg}; falling back to the previous one", flush=True)
        if candidates:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}; start a new workdir"
            )
        return None

    def meta(self, step: int | None = None) -> dict:
        """The JSON saved with `step` (newest when None): {'step', 'params_sha256'}."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}; train first")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"no checkpoint at step {step} in {self.directory} ({steps})")
        return self.mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_subset(self, like_params, step: int):
        """Only the parameters in `like_params` (a sub-tree of the saved ones) from `step`; the
        others are never read. Used to load a model's inference form without its experts."""
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = _abstract(like_params)
        restore_args = jax.tree.map(
            lambda s: ocp.ArrayRestoreArgs(global_shape=s.shape, dtype=s.dtype, sharding=device),
            abstract,
        )
        path = os.path.join(self.directory, str(step), "params")
        try:
            return ocp.PyTreeCheckpointer().restore(
                path,
                args=ocp.args.PyTreeRestore(
                    item=abstract, restore_args=restore_args, partial_restore=True
                ),
            )
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {path} is unreadable ({_short(e)})") from None

    def wait(self) -> None:
        self.mgr.wait_until_finished()

    def close(self) -> None:
        self.mgr.wait_until_finished()
        self.mgr.close()


def _short(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:200] + ("..." if len(text) > 200 else "")
