"""Flash attention (`mole_jax/model/flash.py`): the TPU (splash) and GPU (Triton) kernels, run in
Pallas' interpreter on this CPU, against XLA's attention: outputs and gradients, grouped-query
heads, under a mesh, in a whole model; and which implementation `auto` picks for which target."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from configs import dense, pregated
from mole_jax.errors import ConfigError
from mole_jax.model import flash
from mole_jax.model.backbone import build_model
from mole_jax.model.config import model_config
from mole_jax.parallel.sharding import MESH_AXES
from mole_jax.train.validate import validate


def qkv(heads=4, kv_heads=4, b=2, s=256, k=16, seed=0):
    r = np.random.default_rng(seed)
    q = r.normal(size=(b, s, heads, k))
    kv = [r.normal(size=(b, s, kv_heads, k)) for _ in range(2)]
    return [jnp.asarray(t, jnp.float32) for t in (q, *kv)]


def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def loss_and_grads(fn, q, k, v):
    return jax.value_and_grad(lambda *a: (fn(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("kernel", ["splash", "triton"])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flash_kernels_equal_xla_attention(kernel, kv_heads):
    q, k, v = qkv(kv_heads=kv_heads)
    run = lambda *a: flash.attention(*a, kernel=kernel)
    np.testing.assert_allclose(run(q, k, v), xla(q, k, v), atol=2e-6)
    (lf, gf), (lx, gx) = loss_and_grads(run, q, k, v), loss_and_grads(xla, q, k, v)
    np.testing.assert_allclose(lf, lx, rtol=1e-6)
    for a, b in zip(gf, gx, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5 * float(jnp.abs(b).max()))


def test_flash_under_a_mesh_splits_batch_and_heads_as_the_activations():
    """Inside shard_map over fsdp=4 x tensor=2 (8 host devices): each device's rows and heads."""
    q, k, v = qkv(b=4)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 1, 2), MESH_AXES)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda *a: flash.attention(*a, kernel="triton"))(q, k, v)
    np.testing.assert_allclose(out, xla(q, k, v), atol=2e-6)


@pytest.mark.parametrize("kind", [dense, pregated])
def test_a_model_with_flash_attention_equals_one_with_xla(kind):
    cfg = kind.get_config("size=tiny")
    cfg.model.update(vocab_size=256, max_seq_len=128)
    cfg.data.update(vocab_size=256, seq_len=128)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 128)), jnp.int32)
    out = {}
    for impl in ("xla", "flash"):
        cfg.model.attention = impl
        model = build_model(validate(cfg), seed=3)
        out[impl] = nnx.jit(lambda m, x: m(x).logits_BxLxV)(model, ids)
    np.testing.assert_allclose(out["flash"], out["xla"], atol=1e-5)


def test_auto_picks_flash_on_accelerators_when_the_blocks_divide_the_sequence():
    assert flash.resolve("auto", 2048, "gpu") == flash.resolve("auto", 2048, "tpu") == "flash"
    assert flash.resolve("auto", 2048, "cpu") == "xla"
    assert flash.resolve("auto", 64, "tpu") == "xla"  # tiny: 64 positions, below one block
    assert flash.resolve("xla", 2048, "tpu") == "xla"
    cfg = dense.get_config("size=tiny")
    cfg.model.attention = "flash"
    with pytest.raises(ConfigError, match="model.attention=flash needs data.seq_len=64"):
        validate(cfg)
    cfg.model.attention = "fast"
    with pytest.raises(ConfigError, match="model.attention"):
        validate(cfg)
    assert model_config(dense.get_config("size=160m")).attention == "auto"
