"""Megatron-LM's indexed dataset (`<prefix>.bin` + `<prefix>.idx`, the format the MoLE code trains
the Pile from), read as it is: the token stream is a memory map of the `.bin` file.

`.idx` layout (little endian): the magic b"MMIDIDX\\x00\\x00", version u64 (1), dtype code u8,
sequence count u64, document count u64, then int32 sizes[sequences] (tokens per sequence),
int64 pointers[sequences] (byte offsets into `.bin`) and int64 document_indices[documents]
(the first sequence of each document, with the sequence count last).
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import numpy as np

from mole_jax.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}


@dataclasses.dataclass(frozen=True)
class Index:
    dtype: np.dtype
    sizes: np.ndarray  # int32 [sequences]
    pointers: np.ndarray  # int64 [sequences], bytes
    doc_starts: np.ndarray  # int64 [documents + 1], sequence indices


def read_index(prefix: str | Path) -> Index:
    path = Path(f"{prefix}.idx")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the Megatron index {path} ({e.strerror})") from None
    if raw[:9] != MAGIC:
        raise DataError(f"{path} is not a Megatron indexed dataset (bad magic)")
    version, code = struct.unpack_from("<QB", raw, 9)
    n_seq, n_docs = struct.unpack_from("<QQ", raw, 18)
    if version != 1 or code not in DTYPES:
        raise DataError(f"{path}: unsupported version {version} or dtype code {code}")
    off = 34
    sizes = np.frombuffer(raw, np.int32, n_seq, off)
    off += 4 * n_seq
    pointers = np.frombuffer(raw, np.int64, n_seq, off)
    off += 8 * n_seq
    doc_starts = np.frombuffer(raw, np.int64, n_docs, off)
    return Index(np.dtype(DTYPES[code]), sizes, pointers, doc_starts)


def token_streams(prefix: str | Path, val_fraction: float) -> dict[str, np.ndarray]:
    """{'train', 'val'}: memory maps of the `.bin` tokens, the last `val_fraction` of the
    documents (at least one) held out for validation. Sequences must lie back to back, as
    Megatron's preprocessing writes them."""
    idx = read_index(prefix)
    itemsize = idx.dtype.itemsize
    if len(idx.sizes) == 0:
        raise DataError(f"{prefix}.idx holds no sequences")
    ends = idx.pointers + idx.sizes.astype(np.int64) * itemsize
    if idx.pointers[0] != 0 or np.any(idx.pointers[1:] != ends[:-1]):
        raise DataError(f"{prefix}.bin: sequences are not stored back to back")
    tokens = np.memmap(f"{prefix}.bin", dtype=idx.dtype, mode="r")
    if tokens.nbytes < ends[-1]:
        raise DataError(f"{prefix}.bin is shorter than its index says ({tokens.nbytes} bytes)")
    n_docs = len(idx.doc_starts) - 1
    if n_docs < 2:
        raise DataError(f"{prefix}: {n_docs} document(s); a validation split needs two")
    first_val = n_docs - max(1, round(val_fraction * n_docs))
    cut = int(idx.pointers[idx.doc_starts[first_val]]) // itemsize
    return {"train": tokens[:cut], "val": tokens[cut : int(ends[-1]) // itemsize]}
