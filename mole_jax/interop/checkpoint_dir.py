"""A Hugging Face model directory's tensors: read a slice at a time, written in shards.

Reading parses the safetensors header (8 bytes of length, then JSON: each tensor's dtype, shape
and byte range) and reads the rows a slice needs with `os.pread`, not a memory map: mapped file
pages stay in the process's resident set once touched (a whole checkpoint's worth by the end of
an import), whereas read bytes are freed with the slice. `read(name, index)` therefore holds at
most one tensor's rows. A directory holds `model.safetensors`, or
`model-0000N-of-0000M.safetensors` files named by `model.safetensors.index.json`'s `weight_map`.
Writing goes through `safetensors.numpy.save_file`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mole_jax.errors import UserError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"


DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


class Tensors:
    """The tensors of a model directory, by name."""

    def __init__(self, directory: str | os.PathLike):
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
        self._entries = {}  # name -> (path, dtype, shape, first byte)
        for name in sorted(set(weight_map.values())) if weight_map else [SINGLE]:
            path = d / name
            if not path.is_file():
                raise UserError(f"{path} is named by {INDEX} but does not exist")
            self._entries.update(_header(path))
        if weight_map:
            lost = sorted(
                k for k, f in weight_map.items() if self._entries.get(k, [None])[0] != d / f
            )
            if lost:
                raise UserError(f"{INDEX} names tensors its files lack: {_few(lost)}")

    @property
    def names(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """The slice `index` (a tuple of slices) of tensor `name`, as stored (dtype included):
        the rows of its first axis that the slice spans are read, then sliced."""
        path, dtype, shape, start = self._entries[name]
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        rows = range(*index[0].indices(shape[0])) if shape else range(1)
        row = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        lo, hi = (rows.start, rows.stop) if len(rows) else (0, 0)
        with open(path, "rb") as f:
            raw = os.pread(f.fileno(), (hi - lo) * row, start + lo * row)
        if len(raw) != (hi - lo) * row:
            raise UserError(f"{path} is truncated (tensor {name})")
        block = np.frombuffer(raw, dtype).reshape((hi - lo, *shape[1:]) if shape else ())
        if not shape:
            return block.copy()
        return np.ascontiguousarray(block[(slice(None, None, index[0].step), *index[1:])])


def _header(path: Path) -> dict:
    """{name: (path, dtype, shape, first byte)} from a safetensors file's header."""
    import ml_dtypes  # noqa: F401 - numpy's name for bfloat16

    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        size = path.stat().st_size
        out = {}
        for name, t in header.items():
            if name == "__metadata__":
                continue
            begin, end = t["data_offsets"]
            dtype = np.dtype(DTYPES[t["dtype"]])
            shape = tuple(int(x) for x in t["shape"])
            if 8 + n + end > size or end - begin != dtype.itemsize * int(np.prod(shape)):
                raise ValueError(f"tensor {name} lies outside the file or has the wrong size")
            out[name] = (path, dtype, shape, 8 + n + begin)
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e})") from None


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
