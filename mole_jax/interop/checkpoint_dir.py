"""A Hugging Face model directory's tensors: read a slice at a time, written in shards.

Reading goes through `safetensors.safe_open` (a memory map): `read(name, index)` copies only
the slice asked for, so an import holds one tensor (or one shard of it) in host memory at a
time. A directory holds `model.safetensors`, or `model-0000N-of-0000M.safetensors` files named
by `model.safetensors.index.json`'s `weight_map`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mole_jax.errors import UserError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


class Tensors:
    """The tensors of a model directory, by name."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        d = Path(directory)
        if (d / INDEX).is_file():
            try:
                weight_map = json.loads((d / INDEX).read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{d / INDEX} is not a safetensors index ({e})") from None
        elif (d / SINGLE).is_file():
            weight_map = None
        elif any(d.glob("*.bin")):
            raise UserError(_TORCH_BIN.format(d=d))
        else:
            raise UserError(f"{d} holds no {SINGLE} (nor {INDEX})")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        self._files, self._where = {}, {}
        for name in files:
            path = d / name
            if not path.is_file():
                raise UserError(f"{path} is named by {INDEX} but does not exist")
            try:
                self._files[name] = safe_open(str(path), framework="numpy")
            except Exception as e:  # noqa: BLE001 - safetensors' own error types
                raise UserError(f"{path} is not a readable safetensors file ({e})") from None
            for key in self._files[name].keys():  # noqa: SIM118 - safe_open has no __iter__
                self._where[key] = name
        if weight_map:
            lost = sorted(k for k, f in weight_map.items() if self._where.get(k) != f)
            if lost:
                raise UserError(f"{INDEX} names tensors its files lack: {_few(lost)}")

    @property
    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """The slice `index` (a tuple of slices) of tensor `name`, as stored (dtype included)."""
        return np.asarray(self._slice(name)[index] if index else self._slice(name)[:])

    def _slice(self, name: str):
        return self._files[self._where[name]].get_slice(name)


_TORCH_BIN = (
    "{d} holds PyTorch .bin weights, not safetensors; convert them once where torch is "
    'installed: python -c "import transformers as t; m = t.AutoModelForCausalLM.'
    "from_pretrained('{d}', trust_remote_code=True); m.save_pretrained('{d}-st')\" and import "
    "{d}-st"
)


def _few(names: list[str], n: int = 5) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def write(directory: Path, tensors: dict[str, np.ndarray], shard_bytes: int = 2**31) -> list:
    """Writes `tensors` as safetensors files of at most ~`shard_bytes` each (one file named
    model.safetensors when it fits, else model-0000N-of-0000M.safetensors and the index, as
    `save_pretrained` does); returns the files written."""
    from safetensors.numpy import save_file

    shards, size = [[]], 0
    for name, value in tensors.items():
        if shards[-1] and size + value.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += value.nbytes
    if len(shards) == 1:
        names = [SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    meta = {"format": "pt"}  # what transformers' loaders look for
    for file, keys in zip(names, shards, strict=True):
        save_file({k: np.ascontiguousarray(tensors[k]) for k in keys}, str(directory / file), meta)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
            "weight_map": {k: f for f, keys in zip(names, shards, strict=True) for k in keys},
        }
        (directory / INDEX).write_text(json.dumps(index, indent=1))
        names.append(INDEX)
    return names
