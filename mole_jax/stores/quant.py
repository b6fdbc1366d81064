"""LUT storage formats: float32/float16/bfloat16 as is, int8 with one scale per row, NF4 / NF3 in
blocks; and the 2-4-bit group-wise formats of offloaded MoE experts.

A LUT row is the D values of one (token, expert) pair. Quantisation runs on the host (numpy) at
export; dequantisation runs inside the jitted forward, so only the stored bytes move to the device.

- int8: q = round(x / s) with s = max|x| / 127 per row (float32 scale), |x - q s| <= s / 2.
- nf4 (QLoRA's NormalFloat-4): per block of `block` values along D, x / absmax is rounded to the
  nearest of 16 levels placed at normal quantiles (`nf4_codebook`); absmax is stored as float16
  and two 4-bit codes share a byte (even index in the low nibble). No double quantisation.
- nf3: the same with 8 levels (4 positive and 3 negative normal quantiles plus 0, `nf3_codebook`)
  and 3-bit codes bit-packed 8 to 3 bytes (`pack_bits`); the MoLE paper's Table 8 uses block 128.
"""

from __future__ import annotations

from functools import cache
from statistics import NormalDist

import jax.numpy as jnp
import ml_dtypes
import numpy as np

DTYPES = ("float32", "float16", "bfloat16", "int8", "nf4", "nf3")
FLOAT_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


@cache
def normal_float_codebook(bits: int) -> np.ndarray:
    """The 2^b NormalFloat levels: 2^(b-1) positive and 2^(b-1) - 1 negative normal quantiles
    plus an exact 0, scaled to [-1, 1] (QLoRA, Dettmers et al. 2023, with their offset 0.9677)."""
    offset, ppf, half = 0.9677083, NormalDist().inv_cdf, 2 ** (bits - 1)
    pos = [ppf(offset + (0.5 - offset) * i / half) for i in range(half)]
    neg = [-ppf(offset + (0.5 - offset) * i / (half - 1)) for i in range(half - 1)]
    levels = np.sort(np.array(pos + [0.0] + neg))
    return (levels / np.abs(levels).max()).astype(np.float32)


def nf4_codebook() -> np.ndarray:
    return normal_float_codebook(4)


def nf3_codebook() -> np.ndarray:
    return normal_float_codebook(3)


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., N*b/8]: b-bit codes [..., N] (N a multiple of 8), 8 codes in b bytes,
    little-endian."""
    *lead, n = codes.shape
    shifts = bits * np.arange(8, dtype=np.uint32)
    word = np.bitwise_or.reduce(codes.astype(np.uint32).reshape(*lead, n // 8, 8) << shifts, -1)
    packed = (word[..., None] >> (8 * np.arange(bits, dtype=np.uint32))) & 0xFF
    return packed.astype(np.uint8).reshape(*lead, n // 8 * bits)


def unpack_bits(packed, bits: int):
    """The inverse of `pack_bits`, in jax (runs inside jit): uint32 codes [..., N]."""
    packed = jnp.asarray(packed).astype(jnp.uint32)
    *lead, m = packed.shape
    n, rank = m // bits * 8, len(lead) + 1
    byte_shift = jnp.arange(bits, dtype=jnp.uint32).reshape((1,) * rank + (bits,)) * 8
    word = (packed.reshape(*lead, n // 8, bits) << byte_shift).sum(-1)  # disjoint bits: sum = or
    code_shift = jnp.arange(8, dtype=jnp.uint32).reshape((1,) * rank + (8,)) * bits
    return ((word[..., None] >> code_shift) & (2**bits - 1)).reshape(*lead, n)


def stored_arrays(dtype: str, d: int, block: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Per-row layout of the arrays a LUT layer stores: {name: (trailing shape, dtype)}."""
    if dtype in FLOAT_DTYPES:
        return {"values": ((d,), dtype)}
    if dtype == "int8":
        return {"values": ((d,), "int8"), "scales": ((), "float32")}
    if dtype == "nf4":
        return {"values": ((d // 2,), "uint8"), "scales": ((d // block,), "float16")}
    if dtype == "nf3":
        return {"values": ((d * 3 // 8,), "uint8"), "scales": ((d // block,), "float16")}
    raise ValueError(f"unknown LUT dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def quantize(x_xD: np.ndarray, dtype: str, block: int = 64) -> dict[str, np.ndarray]:
    """float rows [..., D] -> the stored arrays (see `stored_arrays`)."""
    x = np.asarray(x_xD, np.float32)
    if dtype in FLOAT_DTYPES:
        return {"values": x.astype(FLOAT_DTYPES[dtype])}
    if dtype == "int8":
        scale = np.abs(x).max(axis=-1) / 127.0
        safe = np.where(scale > 0, scale, 1.0)[..., None]
        q = np.clip(np.rint(x / safe), -127, 127).astype(np.int8)
        return {"values": q, "scales": scale.astype(np.float32)}
    if dtype in ("nf4", "nf3"):
        *lead, d = x.shape
        xb = x.reshape(*lead, d // block, block)
        absmax = np.abs(xb).max(axis=-1).astype(np.float16)
        safe = np.where(absmax > 0, absmax.astype(np.float32), 1.0)[..., None]
        book = normal_float_codebook(4 if dtype == "nf4" else 3)
        codes = np.abs((xb / safe)[..., None] - book).argmin(axis=-1).astype(np.uint8)
        codes = codes.reshape(*lead, d)
        if dtype == "nf3":
            return {"values": pack_bits(codes, 3), "scales": absmax}
        packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
        return {"values": packed, "scales": absmax}
    raise ValueError(f"unknown LUT dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def dequantize(stored: dict, dtype: str, block: int = 64, out_dtype=jnp.float32):
    """Stored arrays -> float rows [..., D] in `out_dtype`; jax, so it runs inside jit."""
    v = jnp.asarray(stored["values"])
    if dtype in FLOAT_DTYPES:
        return v.astype(out_dtype)
    if dtype == "int8":
        return (v.astype(jnp.float32) * stored["scales"][..., None]).astype(out_dtype)
    if dtype == "nf4":
        lo, hi = v & 0xF, v >> 4
        codes = jnp.stack([lo, hi], axis=-1).reshape(*v.shape[:-1], v.shape[-1] * 2)
        x = jnp.asarray(nf4_codebook())[codes]
        return _scale_blocks(x, stored["scales"], block, out_dtype)
    if dtype == "nf3":
        x = jnp.asarray(nf3_codebook())[unpack_bits(v, 3)]
        return _scale_blocks(x, stored["scales"], block, out_dtype)
    raise ValueError(f"unknown LUT dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def _scale_blocks(x, scales, block: int, out_dtype):
    *lead, d = x.shape
    scale = jnp.asarray(scales).astype(jnp.float32)[..., None]
    return (x.reshape(*lead, d // block, block) * scale).reshape(*lead, d).astype(out_dtype)


def row_bytes(dtype: str, d: int, block: int) -> int:
    """Stored bytes of one D-row, scales included."""
    total = 0
    for shape, dt in stored_arrays(dtype, d, block).values():
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(FLOAT_DTYPES.get(dt, dt)).itemsize
    return total


# Expert weights at 2-4 bits (the MoE-offloading paper's widths and group sizes): group-wise
# min-max affine quantisation along the last axis; per group of g values, zero = min and
# scale = (max - min) / (2^b - 1), both stored as float16 beside the codes; x ~ code * scale + zero
# (|error| <= scale / 2 before the float16 rounding of scale and zero). The codes are bit-packed:
# 8 codes of b bits in b bytes (little-endian), so a weight costs b bits plus 32 / g for its group.
GROUP_DTYPES = {"int4": (4, 64), "int3": (3, 64), "int2": (2, 16)}  # bits, group size


def group_quantize(x: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
    """float [..., N] -> {'codes': uint8 [..., N*b/8], 'scales', 'zeros': float16 [..., N/g]}."""
    bits, g = GROUP_DTYPES[dtype]
    x = np.asarray(x, np.float32)
    if not np.isfinite(x).all() or np.abs(x).max(initial=0) > 3e4:
        raise ValueError(f"{dtype} stores float16 scales and zeros: weights must be finite and "
                         "within ±3e4")  # fmt: skip
    *lead, n = x.shape
    if n % g or n % 8:
        raise ValueError(f"{dtype} needs a last axis divisible by {g} and by 8 (got {n})")
    xg = x.reshape(*lead, n // g, g)
    lo, hi = xg.min(-1), xg.max(-1)
    scale = ((hi - lo) / (2**bits - 1)).astype(np.float16)
    zero = lo.astype(np.float16)
    s = np.where(scale > 0, scale.astype(np.float32), 1.0)[..., None]
    codes = np.clip(np.rint((xg - zero.astype(np.float32)[..., None]) / s), 0, 2**bits - 1)
    codes = codes.reshape(*lead, n)
    return {"codes": pack_bits(codes, bits), "scales": scale, "zeros": zero}


def group_dequantize(stored: dict, dtype: str, out_dtype=jnp.float32):
    """The inverse of `group_quantize` (up to its rounding), in jax: runs inside jit."""
    bits, g = GROUP_DTYPES[dtype]
    codes = unpack_bits(stored["codes"], bits)
    *lead, n = codes.shape
    codes = codes.reshape(*lead, n // g, g).astype(jnp.float32)
    scale = jnp.asarray(stored["scales"]).astype(jnp.float32)[..., None]
    zero = jnp.asarray(stored["zeros"]).astype(jnp.float32)[..., None]
    return (codes * scale + zero).reshape(*lead, n).astype(out_dtype)


def group_bytes(dtype: str, n: int) -> int:
    """Stored bytes of a row of n weights: codes, scales and zeros."""
    bits, g = GROUP_DTYPES[dtype]
    return n * bits // 8 + 2 * 2 * (n // g)
