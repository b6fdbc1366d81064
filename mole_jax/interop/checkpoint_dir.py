"""A Hugging Face model directory's tensors: read a slice at a time, written in shards.

Reading parses the safetensors header (8 bytes of length, then JSON: each tensor's dtype, shape
and byte range) and reads the rows a slice needs with `os.pread`, not a memory map: mapped file
pages stay in the process's resident set once touched (a whole checkpoint's worth by the end of
an import), whereas read bytes are freed once copied. `read_into` reads a slice into the
caller's buffer a chunk of rows at a time. A directory holds `model.safetensors`, or
`model-0000N-of-0000M.safetensors` files named by `model.safetensors.index.json`'s `weight_map`
(or, read through torch when it is installed, PyTorch's `pytorch_model.bin` files, likewise).
Writing goes through `safetensors.numpy.save_file`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mole_jax.errors import UserError

SINGLE, INDEX = "model.safetensors", "model.safetensors.index.json"
TORCH_SINGLE, TORCH_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
CHUNK = 2**25  # bytes read at a time


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
    """The tensors of a model directory, by name: safetensors files, or PyTorch `.bin` files
    (`pytorch_model.bin`, or shards named by `pytorch_model.bin.index.json`) when torch is
    installed (read with `torch.load(mmap=True, weights_only=True)`: no code runs)."""

    def __init__(self, directory: str | os.PathLike):
        d = Path(directory)
        self._torch = None  # {path: state dict} of .bin files, loaded when first read
        if (d / INDEX).is_file() or (d / SINGLE).is_file():
            files, index = _files(d, INDEX, SINGLE)
            self._entries = {}  # name -> (path, dtype, shape, first byte)
            for path in files:
                self._entries.update(_header(path))
        elif (d / TORCH_INDEX).is_file() or (d / TORCH_SINGLE).is_file():
            files, index = _files(d, TORCH_INDEX, TORCH_SINGLE)
            self._torch = {path: _torch_load(path, d) for path in files}
            self._entries = {
                name: (path, None, tuple(t.shape), None)
                for path, tensors in self._torch.items()
                for name, t in tensors.items()
            }
        else:
            raise UserError(f"{d} holds no {SINGLE} (nor {INDEX}, nor {TORCH_SINGLE})")
        if index:
            lost = sorted(k for k, f in index.items() if self._entries.get(k, [None])[0] != d / f)
            if lost:
                raise UserError(f"{d} names tensors in its index that its files lack: {_few(lost)}")

    @property
    def names(self) -> set[str]:
        return set(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][2]

    def read_into(self, out: np.ndarray, name: str, index: tuple, transpose: bool = False):
        """Fills `out` with the slice `index` (contiguous slices, one per axis) of tensor `name`
        (with `transpose`, `out` holds it with its axes reversed), cast to `out`'s dtype; the
        rows of the slice's first axis are read CHUNK bytes at a time, so that what is held
        beyond `out` is one chunk."""
        shape = self.shape(name)
        if not shape:
            out[...] = self._rows(name, 0, 1).reshape(())
            return
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        first, rest = slice(*index[0].indices(shape[0])[:2]), index[1:]
        row = 4 * int(np.prod(shape[1:], dtype=np.int64))
        per = max(1, CHUNK // max(row, 1))
        for lo in range(first.start, first.stop, per):
            hi = min(lo + per, first.stop)
            block = self._rows(name, lo, hi)[(slice(None), *rest)]
            at = slice(lo - first.start, hi - first.start)
            if transpose:
                out[..., at] = block.T
            else:
                out[at] = block

    def _rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Rows lo:hi of tensor `name`'s first axis (a scalar's one value: 0:1), as stored."""
        path, dtype, shape, start = self._entries[name]
        if self._torch is not None:
            import torch

            t = self._torch[path][name]
            t = t.reshape(1) if not shape else t[lo:hi]
            return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
        row = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
        with open(path, "rb") as f:
            raw = os.pread(f.fileno(), (hi - lo) * row, start + lo * row)
        if len(raw) != (hi - lo) * row:
            raise UserError(f"{path} is truncated (tensor {name})")
        return np.frombuffer(raw, dtype).reshape((hi - lo, *shape[1:]))


def _files(d: Path, index_name: str, single: str) -> tuple[list[Path], dict]:
    """The weight files of `d` (one, or those its index names) and the index's weight map."""
    if not (d / index_name).is_file():
        return [d / single], {}
    try:
        weight_map = json.loads((d / index_name).read_text())["weight_map"]
        files = sorted({d / f for f in weight_map.values()})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{d / index_name} is not a weight index ({e})") from None
    for path in files:
        if not path.is_file():
            raise UserError(f"{path} is named by {index_name} but does not exist")
    return files, weight_map


def _torch_load(path: Path, d: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise UserError(_TORCH_BIN.format(d=d)) from None
    for mmap in (True, False):  # files of torch's legacy (pre-zip) format cannot be mapped
        try:
            return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many kinds for a bad file
            error = e
    raise UserError(f"{path} is not a readable PyTorch checkpoint ({error})") from None


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
    "{d} holds PyTorch .bin weights, which are read with torch (not installed here): install "
    'torch, or convert them once where it is installed: python -c "import transformers as t; '
    "m = t.AutoModelForCausalLM.from_pretrained('{d}', trust_remote_code=True); "
    "m.save_pretrained('{d}-st')\" and import {d}-st"
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
