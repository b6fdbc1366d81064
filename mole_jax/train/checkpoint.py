"""Orbax checkpoints of the train state: async saves, keep-K, resume from the newest good step.

Each step directory holds three items: `params`, `train` (optimiser state, step, non-param model
state) and `meta` (JSON: step, the digests of the parameters, of each parameter leaf and of the
train state; `digest.py`, computed where the shards live). A step whose files are missing,
truncated or whose contents no longer match their digests is reported in one line and skipped in
favour of the previous one. Checkpoints written before `digest.py` carry SHA-256 digests
(`params_sha256`, ...) and are verified with those.

`restore_model` loads what inference needs — the parameters of a model form (all of them, or
only the resident ones of an offloaded form) and the non-parameter state — checking every leaf
it reads against its digest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import inspect
import logging
import os
import sys
import traceback
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint._src.metadata.array_metadata_store import Store
from orbax.checkpoint._src.serialization.type_handler_registry import _DEFAULT_TYPE_HANDLERS

from mole_jax.errors import CheckpointError, UserError
from mole_jax.files import check_space
from mole_jax.stores import digest


def _host_value(leaf) -> np.ndarray:
    """A leaf's whole value on this host, also when its shards live on other processes."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    return np.asarray(jax.device_get(leaf))


def _sha256_digests(tree) -> tuple[str, dict[str, str]]:
    """The digests of checkpoints written before `digest.py`: (SHA-256 over the leaves' names and
    bytes in tree order, {leaf path: SHA-256 of its bytes}); each leaf is gathered to the host."""
    total, leaves = hashlib.sha256(), {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path)
        raw = np.ascontiguousarray(_host_value(leaf)).tobytes()
        total.update(name.encode())
        total.update(raw)
        leaves[name] = hashlib.sha256(raw).hexdigest()
    return total.hexdigest(), leaves


_SCHEMES = {  # meta keys (whole params, per leaf, train state) and the function that computes them
    digest.ALGORITHM: (("params_digest", "leaf_digest", "train_digest"), digest.digests),
    "sha256": (("params_sha256", "leaf_sha256", "train_sha256"), _sha256_digests),
}


def _scheme(meta: dict):
    name = meta.get("digest", "sha256")
    if name not in _SCHEMES:  # damage, or a newer mole_jax: unusable here either way
        raise ValueError(
            f"its digests are of kind {name!r}, unknown to this mole_jax ({', '.join(_SCHEMES)}): "
            "damaged, or written by a newer version"
        )
    return _SCHEMES[name]


def params_id(meta: dict) -> str:
    """The digest that identifies a checkpoint's exact weights (stores record it)."""
    (key, _, _), _ = _scheme(meta)
    return meta[key]


def _verify(meta: dict, params=None, train=None, subset: bool = False) -> None:
    """Restored parameters (the whole tree, or with `subset` some of its leaves, checked leaf by
    leaf) and train state against the digests saved with them. The first SHA-256 checkpoints had
    no per-leaf digests: a subset of theirs cannot be checked."""
    (whole, per_leaf, train_key), compute = _scheme(meta)
    if params is not None and per_leaf in meta:
        for name, value in compute(params)[1].items():
            if meta[per_leaf].get(name) != value:
                raise ValueError(f"parameter {name} does not match the digest saved with it")
    elif params is not None and not subset and compute(params)[0] != meta[whole]:
        raise ValueError("parameter bytes do not match the digest saved with them")
    if train is not None and train_key in meta and compute(train)[0] != meta[train_key]:
        raise ValueError("optimiser or model state does not match the digest saved with it")


class _Deferred:
    """An orbax serialization callback putting every array in the transfers that the
    device-to-host byte limit applies to (orbax transfers the others all at once)."""

    def key_priority(self, keypath):
        from orbax.checkpoint._src.serialization.types import TransferPriority

        return TransferPriority.ASYNCHRONOUS_DEPRIORITIZED

    def on_transfer_end(self, keypath):
        pass

    def on_write_end(self, keypath):
        pass


def _staged_handlers(host_bytes: int) -> dict:
    """Item handlers writing the format StandardSave writes, with at most `host_bytes` of
    arrays copied to the host at a time: a save otherwise stages the whole tree on the host
    first (the model's bytes once more: 1.4 GiB for a 410M import)."""
    arrays = ocp.type_handlers.ArrayHandler(array_metadata_store=Store(), callback=_Deferred())
    registry = ocp.type_handlers.create_type_handler_registry(
        *((t, arrays if t is jax.Array else h) for t, h in _DEFAULT_TYPE_HANDLERS)
    )
    gb = max(host_bytes, 2**20) / 1e9  # orbax's unit; must exceed the largest array

    def tree():
        return ocp.PyTreeCheckpointHandler(
            save_device_host_concurrent_gb=gb, type_handler_registry=registry
        )

    logging.getLogger("absl").addFilter(_not_deferred_notice)
    return dict(params=tree(), train=tree(), meta=ocp.JsonCheckpointHandler())


def _not_deferred_notice(record: logging.LogRecord) -> bool:
    """Drops orbax's warning that every array is deferred (what `_Deferred` asks for)."""
    return not str(record.msg).startswith("No prioritized params found")


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


OPT, FRESH = "opt_state", "fresh"


class Checkpointer:
    """The checkpoints of a workdir (a path or a `workdir.Workdir`)."""

    def __init__(
        self,
        workdir,
        keep: int = 3,
        use_async: bool = True,
        run_sha256: str = "",
        host_bytes: int | None = None,
    ):
        """run_sha256: recorded with every save: the digest of what a resumed run must keep
        (train.run_digest: the model and the data), checked when config.json cannot be.
        host_bytes: a save-only checkpointer that stages at most about this many bytes of
        arrays on the host at once (`_staged_handlers`; `launch.py import`'s), not all."""
        self.run_sha256 = run_sha256
        self.directory = os.path.abspath(os.path.join(os.fspath(workdir), "checkpoints"))
        _install_unraisablehook()  # a failed save leaves the same asyncio noise as a read
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=use_async, create=True
        )
        handlers = _staged_handlers(host_bytes) if host_bytes else None
        self._save_arg = ocp.args.PyTreeSave if host_bytes else ocp.args.StandardSave
        self.mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def steps(self) -> list[int]:
        return sorted(self.mgr.all_steps())

    def save(self, state: dict) -> None:
        """Saves {'step', 'params', 'opt_state', 'rest'} at state['step'] (async when enabled).
        Without 'opt_state' the checkpoint says so (meta 'optimizer': 'fresh'): `restore` then
        returns opt_state None, for the trainer to make a fresh one (`launch.py import`'s)."""
        step = int(state["step"])
        size = sum(x.nbytes for x in jax.tree.leaves(state))
        check_space(self.directory, size + 2**20, size, f"the checkpoint of step {step}")
        train = {k: v for k, v in state.items() if k != "params"}
        total, leaves = digest.digests(state["params"])
        meta = {
            "step": step,
            "digest": digest.ALGORITHM,
            "params_digest": total,
            "leaf_digest": leaves,
            "train_digest": digest.digests(train)[0],  # optimiser state, step, model state
            "run_sha256": self.run_sha256,
            **({} if OPT in state else {"optimizer": FRESH}),
        }
        self.mgr.save(
            step,
            args=ocp.args.Composite(
                params=self._save_arg(state["params"]),
                train=self._save_arg(train),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def _restore_state(self, step: int, like: dict):
        fresh = self._read_meta(step).get("optimizer") == FRESH  # saved without one (import)
        train = {k: v for k, v in like.items() if k != "params" and not (fresh and k == OPT)}
        got = self.mgr.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(like["params"])),
                train=ocp.args.StandardRestore(_abstract(train)),
                meta=ocp.args.JsonRestore(),
            ),
        )
        meta = got["meta"]
        _verify(meta, got["params"], got["train"])
        return {"params": got["params"], OPT: None, **got["train"]}, meta

    def restore(self, like: dict, step: int | None = None):
        """(state, meta) of `step`, or of the newest readable step; None if there is none.

        `like` is a train state with the target structure, shapes and dtypes.
        """
        return self._newest(step, lambda s: self._restore_state(s, like))

    def restore_params(self, like_params, like_rest=None, step: int | None = None):
        """((params, rest), meta): only the parameters in `like_params` (a sub-tree of the saved
        ones; the others are never read) and the non-parameter state `like_rest`, of `step` or
        of the newest readable step. Each leaf read is checked against its saved digest."""
        return self._newest(step, lambda s: self._restore_subset(s, like_params, like_rest))

    def _restore_subset(self, step: int, like_params, like_rest):
        meta = self._read_meta(step)
        params = self._read_item(step, "params", like_params)
        rest = like_rest
        if jax.tree.leaves(like_rest):
            rest = self._read_item(step, "train", {"rest": like_rest})["rest"]
        _verify(meta, params, subset=True)
        return (params, rest), meta

    def _read_item(self, step: int, item: str, like):
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = _abstract(like)
        restore_args = jax.tree.map(
            lambda s: ocp.ArrayRestoreArgs(global_shape=s.shape, dtype=s.dtype, sharding=device),
            abstract,
        )
        path = os.path.join(self.directory, str(step), item)
        return ocp.PyTreeCheckpointer().restore(
            path,
            args=ocp.args.PyTreeRestore(
                item=abstract, restore_args=restore_args, partial_restore=True
            ),
        )

    def _newest(self, step: int | None, read):
        """read(step) for `step`, or for the newest step it succeeds on; None when there are no
        checkpoints. A step that fails to read or verify is moved aside to `<step>.corrupt`
        (reported in one line), so that no later run trips over it or trains back into it."""
        steps = self.steps()
        if step is not None and step not in steps:
            raise CheckpointError(f"no checkpoint at step {step} in {self.directory} ({steps})")
        candidates = [step] if step is not None else steps[::-1]
        for s in candidates:
            try:
                with _quiet_asyncio():
                    return read(s)
            except Exception as e:  # noqa: BLE001 - any failure to read means "unusable"
                msg = f"checkpoint {self.directory}/{s} is unreadable or corrupt ({_short(e)})"
                if step is not None:
                    raise CheckpointError(msg) from None
                where = self._quarantine(s)
                print(f"warning: {msg}; moved to {where}, falling back to the previous one")
        if candidates:
            raise CheckpointError(
                f"no readable checkpoint in {self.directory}; start a new workdir"
            )
        return None

    def _read_meta(self, step: int) -> dict:
        return self.mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def meta(self, step: int | None = None) -> dict:
        """The JSON saved with `step` (newest when None): {'step', 'params_digest', ...}."""
        steps = self.steps()
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}; train first")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise CheckpointError(f"no checkpoint at step {step} in {self.directory} ({steps})")
        return self._read_meta(step)

    def _quarantine(self, step: int) -> str:
        """Moves a bad step's directory aside (`<step>.corrupt`, `.corrupt-2`, ...)."""
        src = os.path.join(self.directory, str(step))
        dst, n = f"{src}.corrupt", 1
        while os.path.exists(dst):
            n += 1
            dst = f"{src}.corrupt-{n}"
        try:
            os.replace(src, dst)
        except OSError as e:
            raise CheckpointError(f"cannot move the bad checkpoint {src} aside ({e})") from None
        self.mgr.reload()
        return dst

    def close(self) -> None:
        if self.mgr is None:
            return
        self.mgr.wait_until_finished()
        self.mgr.close()
        self.mgr = None


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint's model, ready for `nnx.merge(graphdef, params, rest)`."""

    graphdef: Any
    params: Any  # pure dict of the form's parameters
    rest: Any  # pure dict of the non-parameter state (BatchNorm statistics)
    step: int
    params_digest: str  # of the whole checkpoint's parameters, as stores record it


def restore_model(workdir, mcfg, form: str = "train", step: int | None = None) -> Restored:
    """The parameters of `form` (model.FORMS) and the model state of a workdir's checkpoint
    (`step`, or the newest readable one)."""
    from mole_jax.model.backbone import abstract_model

    graphdef, like, rest = nnx.split(abstract_model(mcfg, form), nnx.Param, ...)
    ckpt = Checkpointer(workdir)
    try:
        got = ckpt.restore_params(nnx.to_pure_dict(like), nnx.to_pure_dict(rest), step)
    finally:
        ckpt.close()
    if got is None:
        raise UserError(f"{os.fspath(workdir)} has no checkpoint; train it first")
    (params, rest), meta = got
    rest = jax.tree.map(jnp.asarray, rest)
    return Restored(graphdef, params, rest, int(meta["step"]), params_id(meta))


def _read_noise(args) -> bool:
    """Whether an unraisable exception (sys.unraisablehook's `args`) is the aftermath of a failed
    orbax read, whose failure the caller reports once: asyncio's 'Event loop is closed' raised in
    `call_soon_threadsafe` (reads still in flight finish in tensorstore's threads and try to wake
    the closed loop), or the exception of an orbax read coroutine collected unawaited."""
    if inspect.iscoroutine(args.object):
        return "/orbax/" in args.object.cr_code.co_filename
    if args.exc_type is not RuntimeError or str(args.exc_value) != "Event loop is closed":
        return False
    frames = traceback.extract_tb(args.exc_traceback)
    return bool(frames) and frames[-1].name == "_check_closed" and "asyncio" in frames[-1].filename


def _install_unraisablehook() -> None:
    """sys.unraisablehook ignoring `_read_noise` (installed once); anything else goes to the
    hook that was there before."""
    previous = sys.unraisablehook
    if getattr(previous, "mole_jax_quiet", False):
        return

    def hook(args):
        if not _read_noise(args):
            previous(args)

    hook.mole_jax_quiet = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def _quiet_asyncio():
    """Orbax reads with asyncio tasks; a failed read leaves tasks whose exceptions asyncio logs
    (hundreds of lines) when they are collected, and more through sys.unraisablehook
    (`_read_noise`). The failure is reported once, by the caller."""
    _install_unraisablehook()
    logger = logging.getLogger("asyncio")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        gc.collect()  # collect the failed tasks while asyncio's logger is quiet
        logger.setLevel(level)


def _short(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text[:200] + ("..." if len(text) > 200 else "")
