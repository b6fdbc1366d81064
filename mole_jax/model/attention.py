"""Causal multi-head attention with rotary position embeddings and a functional KV cache.

Axis legend: B batch, Q query positions, S key positions, H heads, K head dim, D model.
The cache for one layer is `{'k': <dtype>[B, S_max, H, K], 'v': ...}`; the model owns the shared
write index. With a cache, keys are written at `index + arange(Q)` and every query attends to the
positions <= its own, so one-token decoding reproduces the full forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mole_jax.model import flash
from mole_jax.model.layers import linear, out_std


def rope_frequencies(head_dim: int, theta: float, scaling: str = "") -> np.ndarray:
    """float32 [K/2]: theta^(-2i/K), or Llama 3.1's rescaling of them (`scaling`:
    "llama3:factor=F,low_freq_factor=L,high_freq_factor=H,original_max_position_embeddings=N":
    wavelengths above N/L divided by F, below N/H kept, a smooth blend in between)."""
    half = head_dim // 2
    freq = 1.0 / theta ** (np.arange(half, dtype=np.float64) / half)
    if not scaling:
        return freq.astype(np.float32)
    kind, _, args = scaling.partition(":")
    p = {k: float(v) for k, v in (a.split("=") for a in args.split(","))}
    assert kind == "llama3", kind  # train/validate.py refuses anything else
    n, lo, hi = p["original_max_position_embeddings"], p["low_freq_factor"], p["high_freq_factor"]
    wavelen = 2 * np.pi / freq
    scaled = np.where(wavelen > n / lo, freq / p["factor"], freq)
    smooth = (n / wavelen - lo) / (hi - lo)
    blend = (1 - smooth) * scaled / p["factor"] + smooth * scaled
    medium = (wavelen >= n / hi) & (wavelen <= n / lo)
    return np.where(medium, blend, scaled).astype(np.float32)


def rope(x_BxQxHxK, pos_Q, theta: float, scaling: str = ""):
    """Rotary embedding over the full head dim (NeoX rotate-half layout), in float32."""
    k = x_BxQxHxK.shape[-1]
    half = k // 2
    freq = jnp.asarray(rope_frequencies(k, theta, scaling))
    ang_QxK = pos_Q.astype(jnp.float32)[:, None] * freq[None, :]
    sin, cos = jnp.sin(ang_QxK)[None, :, None, :], jnp.cos(ang_QxK)[None, :, None, :]
    x = x_BxQxHxK.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxQxHxK.dtype)


def causal_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, pos_Q=None, pos_S=None, impl="xla"):
    """softmax(q.k / sqrt(K)) v with key position <= query position, scores and softmax in
    float32. Without positions, query i attends to keys 0..i (training): through a flash kernel
    where `impl` (`model.attention`) resolves to one (`flash.py`), else XLA's
    `jax.nn.dot_product_attention`, as with positions (decoding). Keys and values may have
    fewer heads than the queries (grouped-query attention: each serves H / H_kv consecutive
    query heads)."""
    if pos_Q is None:
        if flash.resolve(impl, q_BxQxHxK.shape[1]) == "flash":
            return flash.attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK)
        return jax.nn.dot_product_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, is_causal=True)
    mask_1x1xQxS = (pos_S[None, :] <= pos_Q[:, None])[None, None]
    return jax.nn.dot_product_attention(q_BxQxHxK, k_BxSxHxK, v_BxSxHxK, mask=mask_1x1xQxS)


class Attention(nnx.Module):
    def __init__(self, m, rngs: nnx.Rngs):
        d = m.d_model
        self.n_heads, self.head_dim, self.theta = m.n_heads, d // m.n_heads, m.rope_theta
        self.kv_heads = m.kv_heads
        self.scaling = m.rope_scaling
        self.impl = m.attention
        d_kv = self.kv_heads * self.head_dim
        self.q = linear(d, d, m, rngs, ("embed", "heads"))
        self.k, self.v = (linear(d, d_kv, m, rngs, ("embed", "heads")) for _ in range(2))
        self.o = linear(d, d, m, rngs, ("heads", "embed"), std=out_std(m))

    def __call__(self, x_BxQxD, pos_Q, kv=None, index=None):
        """Returns (y_BxQxD, new_kv). With `kv`, keys/values are written at `index` first."""
        b, q_len, _ = x_BxQxD.shape
        split = lambda t: t.reshape(b, q_len, -1, self.head_dim)
        q = rope(split(self.q(x_BxQxD)), pos_Q, self.theta, self.scaling)
        k = rope(split(self.k(x_BxQxD)), pos_Q, self.theta, self.scaling)
        v = split(self.v(x_BxQxD))
        if kv is None:
            y = causal_attention(q, k, v, impl=self.impl)
        else:
            k = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), (0, index, 0, 0))
            kv = {"k": k, "v": v}
            pos_S = jnp.arange(k.shape[1])
            y = causal_attention(q, k.astype(q.dtype), v.astype(q.dtype), pos_Q, pos_S)
        return self.o(y.reshape(b, q_len, -1)), kv


def init_kv(batch: int, max_len: int, m, dtype) -> dict:
    shape = (batch, max_len, m.kv_heads, m.d_model // m.n_heads)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
