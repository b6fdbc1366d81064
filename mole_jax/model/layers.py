"""Small building blocks shared by the backbone and the FFN kinds.

Axis legend: B batch, L length, D model, F FFN hidden, E experts, V vocab.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact (erf) GELU, as in the paper
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def expert_activation(m):
    """The activation of stacked routed experts: act, or with `model.ffn.gated`
    h -> act(h[..., :F]) * h[..., F:], their `up` holding [gate | up] (2F wide, see `up_width`),
    so every dispatch path computes a gated expert as it computes a plain one."""
    act = ACTIVATIONS[m.activation]
    if not m.gated:
        return act

    def gated(h):
        f = h.shape[-1] // 2
        return act(h[..., :f]) * h[..., f:]

    return gated


def up_width(m, f: int) -> int:
    """Width of a stacked expert's `up` for F channels: 2F when gated ([gate | up])."""
    return 2 * f if m.gated else f


def ffn_params(m, d: int, f: int) -> int:
    """Parameters of one d -> f -> d FFN without biases: 3df when gated (gate, up, down)."""
    return (3 if m.gated else 2) * d * f


def compute_dtype(m) -> jnp.dtype:
    """The activation/matmul dtype of a model config; parameters are always float32."""
    return jnp.dtype(m.dtype)


def normal(std: float):
    return nnx.initializers.normal(stddev=std)


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], axes: tuple[str | None, ...]):
    """A float32 parameter of `shape` from `init`, its axes named for sharding (sharding.RULES)."""
    return nnx.Param(init(rngs.params(), shape), logical_axes=axes)


def out_std(m) -> float:
    """Init std of an output projection (attention out, FFN / expert down): init_std, scaled by
    1/sqrt(2 * n_layers) with `model.scaled_out_init` (Megatron's output_layer_init_method)."""
    return m.init_std / math.sqrt(2 * m.n_layers) if m.scaled_out_init else m.init_std


def linear(
    d_in: int, d_out: int, m, rngs: nnx.Rngs, axes=("embed", "mlp"), std: float | None = None
) -> nnx.Linear:
    """Bias-free projection with fp32 params, compute in the config dtype, init normal(std,
    default init_std); `axes`: the logical names of the kernel's (input, output) axes."""
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=False,
        dtype=compute_dtype(m),
        param_dtype=jnp.float32,
        kernel_init=normal(m.init_std if std is None else std),
        kernel_metadata={"logical_axes": axes},
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """y = x / rms(x) * scale, computed in float32 and cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].reshape((1,) * (y.ndim - 1) + (-1,))
        return (y * scale).astype(x.dtype)


class Mlp(nnx.Module):
    """down(act(up(x))): the non-gated, bias-free FFN of the MoLE paper; with `model.ffn.gated`
    down(act(gate(x)) * up(x)) (Llama's SwiGLU when act is silu). [..., D] -> [..., D]."""

    def __init__(self, d_model: int, d_ff: int, m, rngs: nnx.Rngs):
        if m.gated:
            self.gate = linear(d_model, d_ff, m, rngs, ("embed", "mlp"))
        self.up = linear(d_model, d_ff, m, rngs, ("embed", "mlp"))
        self.down = linear(d_ff, d_model, m, rngs, ("mlp", "embed"), std=out_std(m))
        self.act = ACTIVATIONS[m.activation]

    def __call__(self, x_xD):
        if hasattr(self, "gate"):
            return self.down(self.act(self.gate(x_xD)) * self.up(x_xD))
        return self.down(self.act(self.up(x_xD)))
