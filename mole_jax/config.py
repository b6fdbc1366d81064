"""Config plumbing: `:arg` strings, the SIZES table, loading files and overrides, (de)serialisation.

Configs are `ml_collections.ConfigDict`s built by `configs/<kind>.py:get_config(arg)`. Everything
the run needs is in the resolved config written to `<workdir>/config.json`; `export`, `eval` and
`generate` read it back through `workdir.Workdir.config`. Modules never read the config tree: the
model gets the typed `model.config.ModelConfig` that `train.validate.validate` returns.
"""

from __future__ import annotations

import math
import os
from types import SimpleNamespace
from typing import Any

import ml_collections

from mole_jax.errors import ConfigError

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
