"""`launch.py import`: a Hugging Face model directory -> an ordinary workdir at step 0.

The workdir holds what `train` writes (config.json, tokenizer.json, model_summary.json,
checksums) and a verified step-0 checkpoint of the imported parameters (without an optimiser
state: `train` makes a fresh one when it starts from it),
plus `import.json` (the source, its architecture, what the import decided). Every command works
on it unchanged; `train` fine-tunes from it.

Streaming and sharded: the configured mesh is built first and each parameter is made with
`jax.make_array_from_callback`, whose callback reads only the slice of the checkpoint tensor
that a device's shard holds (read with os.pread, checkpoint_dir.py), so no host copy of the
model exists beyond the tensor in flight.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mole_jax.data.pipeline import EOS_TOKENS, eos_token, load_tokenizer
from mole_jax.errors import UserError
from mole_jax.files import write_text_atomic
from mole_jax.interop import families
from mole_jax.interop.checkpoint_dir import Tensors, _few
from mole_jax.train.checkpoint import Checkpointer
from mole_jax.train.loop import run_digest, write_workdir
from mole_jax.train.trainer import setup
from mole_jax.workdir import as_workdir

RECORD, PARTIAL = "import.json", "import.partial"


def read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise UserError(f"{src} is not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path} holds a {type(config).__name__}, not a JSON object")
    return config


def kind_of(src) -> str:
    """The mole_jax FFN kind the model directory `src` imports as (to pick its config file)."""
    return families.kind_of(read_config(Path(src)))


def import_hf(src, workdir, cfg, tokenizer: str | None = None) -> dict:
    """Imports the model directory `src` into `workdir`; `cfg`: a run config of the model's
    kind (its data, train and mesh sections are kept; the model's shape comes from `src`).
    Returns what import.json records."""
    src, wd = Path(src), as_workdir(workdir)
    hf = read_config(src)
    backbone, ffn, notes = families.model_fields(hf)
    tok_path = Path(tokenizer) if tokenizer else src / "tokenizer.json"
    tok = _tokenizer(tok_path, backbone["vocab_size"], tokenizer is None)
    cfg = _configured(cfg, families.kind_of(hf), backbone, ffn, wd)
    cfg.data.vocab_size = tok.get_vocab_size()  # (the size of the tokenizer it trains without one)
    record = dict(
        source=str(src.resolve()),
        source_sha256=_source_digest(src, cfg),
        architecture=hf["architectures"][0],
        kind=cfg.model.ffn.kind,
        tokenizer=str(tok_path.resolve()),
        notes=notes,
    )
    if _already(wd, record):
        return json.loads((wd.path / RECORD).read_text())
    trainer = setup(cfg)
    tensors = Tensors(src)
    plan = families.tensors(trainer.model_config)
    _check_names(plan, tensors)
    with jax.set_mesh(trainer.mesh):
        params = place(plan, tensors, trainer.abstract_state["params"])
    record["tensors"] = len(plan)
    _write(wd, cfg, trainer, params, tok.to_str(), record)
    return record


def _tokenizer(path: Path, vocab_size: int, from_dir: bool):
    if not path.is_file():
        hint = " (pass --tokenizer=PATH/tokenizer.json)" if from_dir else ""
        raise UserError(f"{path} does not exist{hint}")
    tok = load_tokenizer(str(path))
    if tok.get_vocab_size() > vocab_size:
        raise UserError(
            f"{path} has {tok.get_vocab_size()} tokens, more than the model's "
            f"vocab_size={vocab_size}"
        )
    if eos_token(tok) is None:
        raise UserError(
            f"{path} has none of {', '.join(EOS_TOKENS)} (mole_jax separates "
            "documents with its end-of-text token)"
        )
    return tok


def _configured(cfg, kind: str, backbone: dict, ffn: dict, wd):
    if cfg.model.ffn.kind != kind or kind != "dense" and kind not in cfg.model.ffn:
        raise UserError(f"the model is '{kind}'; pass --config=configs/{kind}.py (or none)")
    cfg = cfg.copy_and_resolve_references()
    cfg.unlock()
    cfg.model.ffn.gated = backbone.pop("gated")
    cfg.model.update(backbone)
    cfg.model.ffn.layers = "all"
    if ffn:
        cfg.model.ffn[kind].update(ffn)
    cfg.data.tokenizer = str(wd.tokenizer_path.resolve())
    cfg.data.seq_len = min(cfg.data.seq_len, backbone["max_seq_len"])
    return cfg


def _check_names(plan, tensors: Tensors) -> None:
    want = {t.hf for t in plan}
    missing, extra = sorted(want - tensors.names), sorted(tensors.names - want)
    if missing:
        raise UserError(f"the checkpoint lacks {len(missing)} tensor(s): {_few(missing)}")
    if extra:
        raise UserError(
            f"the checkpoint has {len(extra)} tensor(s) the model has no place for: {_few(extra)}"
        )


def place(plan, tensors: Tensors, abstract_params: dict) -> dict:
    """The parameter tree, each leaf made on its sharding from the slices its shards hold."""
    by_path = defaultdict(list)
    for t in plan:
        by_path[t.path].append(t)

    def leaf(path, a):
        key = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
        parts = by_path.pop(key)
        per_slot = len(parts) // (a.shape[0] if parts[0].expert is not None else 1)
        for t in parts:
            _check_shape(t, tensors, a.shape[1:] if t.expert is not None else a.shape, per_slot)
        return jax.make_array_from_callback(a.shape, a.sharding, _reader(parts, tensors, a.shape))

    params = jax.tree_util.tree_map_with_path(leaf, abstract_params)
    assert not by_path, f"tensors without a parameter: {sorted(by_path)}"  # families.tensors
    return params


def _oriented(t, shape: tuple) -> tuple:
    return tuple(shape[::-1]) if t.transpose else tuple(shape)


def _check_shape(t, tensors: Tensors, want: tuple, parts: int) -> None:
    """`t` must be exactly its share of the leaf: the leaf's last axis split evenly among the
    `parts` tensors that fill one slot (Mixtral's w1 and w3: half each; otherwise the whole)."""
    got = _oriented(t, tensors.shape(t.hf))
    width = want[-1] // parts if want else 0
    if got != (*want[:-1], width) or t.offset % max(width, 1) or t.offset + width > want[-1]:
        raise UserError(
            f"tensor {t.hf} has shape {list(tensors.shape(t.hf))}; the config "
            f"implies {list(_oriented(t, want))}"
        )


def _reader(parts, tensors: Tensors, shape: tuple):
    """The callback that fills one shard (`index`: a slice per axis) from the parts' slices."""
    stacked = parts[0].expert is not None

    def read(index):
        index = tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(index, shape, strict=True))
        out = _nan_buffer([sl.stop - sl.start for sl in index])
        experts = range(index[0].start, index[0].stop) if stacked else None
        sub = index[1:] if stacked else index
        for t in parts:
            if stacked and t.expert not in experts:
                continue
            width = _oriented(t, tensors.shape(t.hf))[-1]
            lo, hi = max(sub[-1].start, t.offset), min(sub[-1].stop, t.offset + width)
            if lo >= hi:
                continue
            src = (*sub[:-1], slice(lo - t.offset, hi - t.offset))
            at = (slice(None),) * (len(sub) - 1) + (slice(lo - sub[-1].start, hi - sub[-1].start),)
            view = out[(experts.index(t.expert), *at) if stacked else at]
            tensors.read_into(view, t.hf, src[::-1] if t.transpose else src, t.transpose)
        return out

    return read


def _nan_buffer(shape: list) -> np.ndarray:
    """A float32 array of NaN (a part no tensor filled could never pass for weights) on a
    64-byte boundary: jax's CPU client then adopts it as the device buffer instead of copying
    it, so that a tensor is never held twice."""
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(4 * n + 64, np.uint8)
    at = -raw.ctypes.data % 64
    out = raw[at : at + 4 * n].view(np.float32).reshape(shape)
    out.fill(np.nan)
    return out


def _source_digest(src: Path, cfg) -> str:
    """Of the source (its path, config.json, each weight file's size and mtime and each
    safetensors file's header: not their contents, which may be tens of GB) and of the run
    config it is imported with."""
    h = hashlib.sha256(f"{src.resolve()}|{run_digest(cfg)}".encode())
    h.update((src / "config.json").read_bytes())
    for p in sorted([*src.glob("*.safetensors"), *src.glob("*.bin")]):
        if p.suffix == ".safetensors":
            with open(p, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                h.update(f.read(min(n, 2**26)))
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _already(wd, record: dict) -> bool:
    """True when `wd` holds this very import; refused when it holds anything else."""
    d = wd.checkpoints_dir
    steps = {p.name for p in d.iterdir() if p.name.isdigit()} if d.is_dir() else set()
    if not steps or (wd.path / PARTIAL).exists():
        return False
    try:
        done = json.loads((wd.path / RECORD).read_text())
    except (OSError, ValueError):
        done = {}
    if done.get("source_sha256") == record["source_sha256"]:
        return True
    raise UserError(f"{wd} already holds another run; import into a new workdir")


def _write(wd, cfg, trainer, params, tokenizer_json: str, record: dict) -> None:
    with wd.writer_lock("import"):
        wd.path.mkdir(parents=True, exist_ok=True)
        (wd.path / PARTIAL).touch()
        shutil.rmtree(wd.checkpoints_dir, ignore_errors=True)  # a killed import's, if any
        write_workdir(cfg, wd, tokenizer_json)
        rest = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), trainer.abstract_state["rest"])
        # no optimiser state: `train` makes a fresh one on resuming step 0 (an import's RSS is
        # the model's own bytes, not three times them)
        state = dict(step=jnp.zeros((), jnp.int32), params=params, rest=rest)
        largest = max(x.nbytes for x in jax.tree.leaves(params))
        ckpt = Checkpointer(wd, cfg.train.keep_ckpts, False, run_digest(cfg), largest + 2**20)
        try:
            ckpt.save(state)
        finally:
            ckpt.close()
        write_text_atomic(wd.path / RECORD, json.dumps(record, indent=1))
        (wd.path / PARTIAL).unlink()
