"""Causal attention through a flash kernel (Pallas): the scores are computed block by block in
on-chip memory, never written to HBM, and blocks above the diagonal are skipped. The compiled
paper-size steps spend a third of their memory traffic on XLA's materialised S x S scores
(docs/scaling.md, "Compiling for the hardware"); these kernels remove it.

    TPU   splash attention (jax.experimental.pallas.ops.tpu.splash_attention)
    GPU   Pallas' Triton flash attention (jax.experimental.pallas.ops.gpu.attention)
    CPU   either kernel in Pallas' interpreter (tests compare it with XLA's attention)

`model.attention` picks: 'xla' (jax.nn.dot_product_attention), 'flash', or 'auto' = flash on a
GPU or TPU target whose sequence length splits into the kernels' blocks, XLA otherwise. The
kernels see one device's rows: under a mesh they run inside `jax.shard_map`, split over the
batch (and the heads over `tensor`) as the activations are.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mole_jax.parallel import sharding

IMPLS = ("auto", "xla", "flash")
BLOCK = 128  # positions per kernel block (splash needs multiples of 128)


def resolve(impl: str, seq_len: int, platform: str | None = None) -> str:
    """'xla' | 'flash' for `model.attention` on `platform` (default: the traced mesh's)."""
    if impl != "auto":
        return impl
    on_device = (platform or sharding.platform()) in ("gpu", "tpu")
    return "flash" if on_device and seq_len % BLOCK == 0 else "xla"


def attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxK, kernel: str | None = None):
    """softmax(q.k / sqrt(K)) v, causal, with a flash kernel ('splash' | 'triton'; default: the
    platform's). Keys and values may have fewer heads (grouped-query): they are repeated."""
    platform = sharding.platform()
    kernel = kernel or ("splash" if platform == "tpu" else "triton")
    heads = q_BxSxHxK.shape[2]
    if k_BxSxHxK.shape[2] != heads:
        rep = heads // k_BxSxHxK.shape[2]
        k_BxSxHxK, v_BxSxHxK = (jnp.repeat(t, rep, axis=2) for t in (k_BxSxHxK, v_BxSxHxK))
    run = functools.partial(_KERNELS[kernel], interpret=platform == "cpu")
    mesh = sharding.current_mesh()
    if mesh is None:
        return run(q_BxSxHxK, k_BxSxHxK, v_BxSxHxK)
    spec = P(sharding.mesh_axes("batch") or None, None, sharding.mesh_axes("heads") or None, None)
    return jax.shard_map(run, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(
        q_BxSxHxK, k_BxSxHxK, v_BxSxHxK
    )


def _splash(q, k, v, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, s, h, d = q.shape
    n = min(BLOCK * 4, s)
    blocks = sk.BlockSizes(block_q=n, block_kv=n, block_kv_compute=n, block_q_dkv=n,
                           block_kv_dkv=n, block_kv_dkv_compute=n, block_q_dq=n,
                           block_kv_dq=n)  # fmt: skip
    mask = sm.MultiHeadMask([sm.CausalMask((s, s)) for _ in range(h)])
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                                interpret=interpret)  # fmt: skip
    heads_first = lambda t: t.swapaxes(1, 2)  # the kernel's [H, S, K] per sequence
    q = (q.astype(jnp.float32) / math.sqrt(d)).astype(q.dtype)  # splash does not scale
    out = jax.vmap(kernel)(heads_first(q), heads_first(k), heads_first(v))
    return heads_first(out)


def _triton(q, k, v, interpret: bool):
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

    s, d = q.shape[1], q.shape[3]
    n = min(BLOCK if d <= 64 else BLOCK // 2, s)  # 128 x 128 blocks of K = 128 overflow an
    # H100's shared memory (the compiler refuses them: 320 KiB asked, 227 KiB there)
    blocks = pallas_gpu.BlockSizes(block_q=n, block_k=n, block_q_dkv=n, block_kv_dkv=n,
                                   block_q_dq=n, block_kv_dq=n)  # fmt: skip
    return pallas_gpu.mha(q, k, v, segment_ids=None, sm_scale=1 / math.sqrt(d), causal=True,
                          block_sizes=blocks, interpret=interpret)  # fmt: skip


_KERNELS = {"splash": _splash, "triton": _triton}
