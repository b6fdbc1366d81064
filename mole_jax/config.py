"""Config plumbing: `:arg` strings, the SIZES table, one-line validation errors, (de)serialisation.

Configs are `ml_collections.ConfigDict`s built by `configs/<kind>.py:get_config(arg)`. Everything
the run needs is in the resolved config written to `<workdir>/config.json`; `export`, `eval` and
`generate` read it back through `workdir.Workdir.config`. Modules never read the config tree: the
model gets the typed `model_config.ModelConfig` that `validate` returns.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace
from typing import Any

import ml_collections

from mole_jax.errors import ConfigError, require, require_one_of

# Model shapes and per-size training defaults. 160m/410m/1b are the Pythia shapes of the MoLE paper
# (Table 2; GPT-NeoX vocab padded to 50,304; seq 2048; 1024 sequences per step). `tiny` trains in
# seconds on a 2-core CPU, `small` in minutes.
SIZES: dict[str, dict[str, Any]] = {
    # name:    layers  D     heads  F      V       seq   batch steps   lr
    "tiny": dict(n_layers=2, d_model=64, n_heads=4, d_ff=256, vocab_size=8192,
                 seq_len=64, batch_size=16, steps=300, lr=3e-3),
    "small": dict(n_layers=4, d_model=256, n_heads=4, d_ff=1024, vocab_size=8192,
                  seq_len=128, batch_size=16, steps=600, lr=2e-3),
    "160m": dict(n_layers=12, d_model=768, n_heads=12, d_ff=3072, vocab_size=50304,
                 seq_len=2048, batch_size=1024, steps=50_000, lr=6e-4),
    "410m": dict(n_layers=24, d_model=1024, n_heads=16, d_ff=4096, vocab_size=50304,
                 seq_len=2048, batch_size=1024, steps=50_000, lr=3e-4),
    "1b": dict(n_layers=16, d_model=2048, n_heads=8, d_ff=8192, vocab_size=50304,
               seq_len=2048, batch_size=1024, steps=50_000, lr=3e-4),
}  # fmt: skip
CPU_SIZES = ("tiny", "small")


def parse_arg(arg: str | None, defaults: dict[str, Any]) -> SimpleNamespace:
    """Parses `'size=tiny,experts=4'` into a namespace typed after `defaults`.

    Unknown keys and values that do not convert to the default's type raise ConfigError.
    """
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"config argument '{item}' must look like key=value (in '{arg}')")
        if key not in defaults:
            known = ", ".join(sorted(defaults))
            raise ConfigError(f"unknown config argument '{key}' (in '{arg}'); known: {known}")
        out[key] = coerce(key, value.strip(), defaults[key])
    if "size" in out and out["size"] not in SIZES:
        raise ConfigError(f"size='{out['size']}' is not one of {', '.join(SIZES)}")
    return SimpleNamespace(**out)


def coerce(key: str, value: str, default: Any) -> Any:
    kind = type(default)
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        return kind(value)
    except ValueError:
        raise ConfigError(f"config argument {key}={value!r} is not a {kind.__name__}") from None


def _positive(cfg: ml_collections.ConfigDict, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = cfg[name]
        require(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{prefix}.{name}={value!r} must be a positive integer",
        )


def validate(cfg: ml_collections.ConfigDict, n_devices: int | None = None):
    """Raises ConfigError naming the first offending field; returns the typed model config
    (`model_config.ModelConfig`). Runs before anything compiles."""
    from mole_jax import ffn  # late import: ffn modules import jax
    from mole_jax.model_config import model_config

    m, d, t = cfg.model, cfg.data, cfg.train
    _positive(m, "model", ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"))
    _positive(d, "data", ("seq_len", "vocab_size"))
    _positive(t, "train", ("steps", "batch_size", "microbatches", "eval_batches", "log_every"))
    require(
        m.d_model % m.n_heads == 0,
        f"model.n_heads={m.n_heads} must divide model.d_model={m.d_model}",
    )
    require(
        (m.d_model // m.n_heads) % 2 == 0,
        f"head dim model.d_model/model.n_heads={m.d_model // m.n_heads} must be even for RoPE",
    )
    require_one_of(m.dtype, ("float32", "bfloat16"), "model.dtype")
    require_one_of(m.remat, ("none", "full", "dots"), "model.remat")
    require_one_of(t.token_tables, ("step", "microbatch"), "train.token_tables")
    require(
        t.loss_chunk >= 0 and (t.loss_chunk == 0 or d.seq_len % t.loss_chunk == 0),
        f"train.loss_chunk={t.loss_chunk} must be 0 or divide data.seq_len={d.seq_len}",
    )
    require(m.init_std > 0, f"model.init_std={m.init_std} must be > 0")
    require(
        d.seq_len <= m.max_seq_len,
        f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len} (RoPE/KV-cache limit)",
    )
    require(
        d.vocab_size <= m.vocab_size,
        f"data.vocab_size={d.vocab_size} (tokenizer) exceeds model.vocab_size={m.vocab_size}",
    )
    require(0.0 < d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    require_one_of(d.get("format", "auto"), ("auto", "text", "jsonl", "parquet"), "data.format")
    _validate_train(t)
    _validate_mesh(cfg, n_devices)
    mcfg = model_config(cfg)
    ffn.KINDS[mcfg.kind].validate(mcfg)
    return mcfg


def _validate_train(t: ml_collections.ConfigDict) -> None:
    require(t.lr > 0, f"train.lr={t.lr} must be > 0")
    require(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    require(0.0 <= t.warmup_frac < 1.0, f"train.warmup_frac={t.warmup_frac} must be in [0, 1)")
    require(t.clip > 0, f"train.clip={t.clip} must be > 0")
    require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    require(0 <= t.b1 < 1 and 0 <= t.b2 < 1, f"train.b1={t.b1}, train.b2={t.b2} must be in [0, 1)")
    require(t.eval_every >= 0 and t.ckpt_every >= 0, "train.eval_every/ckpt_every must be >= 0")
    require(
        t.profile_at >= 0 and t.profile_steps >= 1,
        f"train.profile_at={t.profile_at} must be >= 0 and train.profile_steps >= 1",
    )
    require(t.keep_ckpts >= 1, f"train.keep_ckpts={t.keep_ckpts} must be >= 1")
    require(
        t.batch_size % t.microbatches == 0,
        f"train.batch_size={t.batch_size} must be divisible by train.microbatches={t.microbatches}",
    )


def planned_devices(mesh_cfg) -> int:
    """The devices `cfg.mesh` asks for when its -1 axis (if any) is 1: what `summary` plans for."""
    return math.prod(max(1, mesh_cfg[a]) for a in ("data", "fsdp", "expert", "tensor"))


def _validate_mesh(cfg: ml_collections.ConfigDict, n_devices: int | None) -> None:
    """The mesh must cover the devices (n_devices, default all of them) and split the batch."""
    from mole_jax.sharding import batch_ways, mesh_shape

    if n_devices is None:
        import jax

        n_devices = jax.device_count()
    sizes = mesh_shape(cfg.mesh, n_devices)
    t, ways = cfg.train, batch_ways(sizes)
    micro = t.batch_size // t.microbatches
    require(
        micro % ways == 0,
        f"train.batch_size/train.microbatches={micro} must be divisible by the {ways} devices "
        "that split the batch (mesh.data * mesh.fsdp * mesh.expert)",
    )


def load_file(spec: str) -> ml_collections.ConfigDict:
    """The config of a `path.py:arg` string as `--config=` takes it: "configs/moe.py:size=tiny".

    The path is relative to the working directory; the file's `get_config(arg)` builds the config.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' (in '{spec}') does not exist")
    module = user_code(f"config file '{path}'", load_module, path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file '{path}' has no get_config(arg) function")
    return user_code(f"{path}: get_config({arg!r})", module.get_config, arg or None)


def user_code(what: str, fn, *args):
    """fn(*args) where fn is the user's own code (a config or study file): whatever it raises
    becomes one ConfigError line naming `what` and the file and line it failed at."""
    try:
        return fn(*args)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code may raise anything
        import traceback

        frames = traceback.extract_tb(e.__traceback__)
        at = next((f for f in reversed(frames) if "mole_jax" not in f.filename), None)
        where = f" at {at.filename}:{at.lineno}" if at else ""
        if isinstance(e, SyntaxError):
            where = f" at {e.filename}:{e.lineno}"
        msg = str(e).replace("\n", " ")[:200]
        raise ConfigError(f"{what} failed ({type(e).__name__}: {msg}){where}") from None


def load_module(path: str):
    """Imports a Python file by path (a config or a study), with its folder's parent importable
    so that `from configs import common` works as it does under launch.py."""
    import importlib.util
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)
    name = "_mole_jax_file_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def apply_overrides(
    cfg: ml_collections.ConfigDict, overrides: dict[str, Any] | str
) -> ml_collections.ConfigDict:
    """Sets dotted fields in place: {'train.steps': 50} or 'train.steps=50,data.seq_len=32'.

    String values are converted to the field's type; a field the config does not have raises
    ConfigError naming it.
    """
    if isinstance(overrides, str):
        items = [i.partition("=")[::2] for i in filter(None, overrides.split(","))]
    else:
        items = list(overrides.items())
    for path, value in items:
        *parents, leaf = path.strip().split(".")
        node = cfg
        try:
            for p in parents:
                node = node[p]
            current = node[leaf]
        except (KeyError, AttributeError, TypeError):
            raise ConfigError(f"override '{path}': the config has no such field") from None
        if isinstance(value, str) and current is not None and not isinstance(current, str):
            value = coerce(path, value, current)
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(f"override {path}={value!r}: {e}") from None
    return cfg


def warmup_steps(cfg: ml_collections.ConfigDict) -> int:
    return int(math.ceil(cfg.train.warmup_frac * cfg.train.steps))


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return cfg.to_json_best_effort(indent=2, sort_keys=True)


def from_dict(raw: dict) -> ml_collections.ConfigDict:
    """A config from its JSON form (`to_json`); JSON lists become the tuples configs hold."""
    return ml_collections.ConfigDict(_tuples(raw))


def _tuples(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    if isinstance(x, list):
        return tuple(_tuples(v) for v in x)
    return x
