"""The Llama-family backbone fields (grouped-query attention, gated FFN, tied head, llama3
RoPE rescaling) as ordinary config fields: they build, count, validate, train and decode, and
a workdir written before they existed resumes unchanged."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_overrides

from configs import dense, moe, mole, peer, pregated
from mole_jax.errors import ConfigError
from mole_jax.model.attention import rope_frequencies
from mole_jax.model.backbone import build_model, new_cache
from mole_jax.train import accounting, loop
from mole_jax.train.metrics import read_metrics
from mole_jax.train.validate import validate
from mole_jax.workdir import Workdir

LLAMA3 = "llama3:factor=8,low_freq_factor=1,high_freq_factor=4,original_max_position_embeddings=64"


def llama_like(cfg):
    cfg.unlock()
    cfg.model.update(n_kv_heads=2, tie_embeddings=True, rope_scaling=LLAMA3, activation="silu")
    cfg.model.ffn.gated = True
    return cfg


def test_llama_fields_count_exactly_and_decode_like_the_full_forward():
    cfg = llama_like(dense.get_config("size=tiny"))
    m = validate(cfg, n_devices=1)
    s = accounting.summarize(cfg, 1)
    assert s["params_total"] == s["params_total_formula"]
    plain = accounting.summarize(dense.get_config("size=tiny"), 1)["params_total"]
    d, f, v, layers = 64, 256, 8192, 2
    # + a gate per FFN, - half of k and v (2 of 4 heads), - the head (tied)
    assert s["params_total"] == plain + layers * (d * f - d * d) - d * v
    model = build_model(m)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 12)), jnp.int32)
    full = model(ids).logits_BxLxV
    cache, steps = new_cache(m, 2, 12), []
    for t in range(12):
        out = model(ids[:, t : t + 1], cache=cache)
        cache = out.cache
        steps.append(out.logits_BxLxV)
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=2e-5)
    assert cache["layers"][0]["k"].shape[2] == 2  # the KV cache holds the 2 key/value heads


def test_llama3_rescaling_keeps_high_frequencies_and_divides_low_ones():
    plain, scaled = rope_frequencies(16, 500000.0), rope_frequencies(16, 500000.0, LLAMA3)
    wavelen = 2 * np.pi / plain
    assert np.array_equal(scaled[wavelen < 64 / 4], plain[wavelen < 64 / 4])
    np.testing.assert_allclose(scaled[wavelen > 64], plain[wavelen > 64] / 8, rtol=1e-6)
    middle = (wavelen >= 16) & (wavelen <= 64)
    assert np.all(scaled[middle] < plain[middle]) and np.all(scaled[middle] > plain[middle] / 8)


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(n_kv_heads=3), "n_kv_heads=3 must divide"),
        (dict(rope_scaling="yarn:factor=4"), "only 'llama3:'"),
        (dict(rope_scaling="llama3:factor=8"), "only 'llama3:'"),
    ],
)
def test_bad_llama_fields_name_themselves(fields, message):
    cfg = dense.get_config("size=tiny")
    cfg.model.update(fields)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, n_devices=1)


def test_gated_peer_experts_are_refused_until_built():
    cfg = peer.get_config("size=tiny")
    cfg.model.ffn.gated = True
    with pytest.raises(ConfigError, match="gated 'peer' expert is not yet"):
        validate(cfg, n_devices=1)


@pytest.mark.parametrize("module,arg", [(mole, "size=tiny,experts=4"), (pregated, "size=tiny")])
def test_gated_experts_count_exactly(module, arg):
    cfg = module.get_config(arg)
    cfg.model.ffn.gated, cfg.model.activation = True, "silu"
    validate(cfg, n_devices=1)
    s = accounting.summarize(cfg, 1)
    assert s["params_total"] == s["params_total_formula"]


@pytest.mark.parametrize(
    "dispatch,grouped", [("dropless", "blocked"), ("dropless", "ragged"), ("capacity", "auto")]
)
def test_gated_moe_equals_a_loop_over_tokens_and_their_experts(dispatch, grouped):
    """A gated MoE layer, through each dispatch path, against a per-token loop that applies
    down(silu(gate x) * up x) of each chosen expert with its weight (capacity: large enough that
    nothing drops)."""
    from flax import nnx

    from mole_jax.model.ffn import moe as moe_ffn
    from mole_jax.model.ffn.base import Ctx

    cfg = moe.get_config("size=tiny")
    cfg.model.ffn.gated, cfg.model.activation = True, "silu"
    cfg.model.ffn.moe.update(dict(dispatch=dispatch, grouped=grouped, capacity_factor=8.0))
    m = validate(cfg, n_devices=1)
    layer = moe_ffn.Layer(m, 0, rngs=nnx.Rngs(params=0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, m.d_model)), jnp.float32)
    y, aux = layer(x, Ctx(None, None))
    assert "dropped" not in aux or float(aux["dropped"]) == 0
    r = layer.route(x)
    up, down = np.asarray(layer.up[...]), np.asarray(layer.down[...])
    f = down.shape[1]
    xs, want = np.asarray(x).reshape(-1, m.d_model), []
    for t, xt in enumerate(xs):
        out = 0
        for w, e in zip(np.asarray(r.weights_TxK[t]), np.asarray(r.experts_TxK[t]), strict=True):
            h = np.asarray(jax.nn.silu(xt @ up[e, :, :f])) * (xt @ up[e, :, f:])
            out = out + w * (h @ down[e])
        want.append(out)
    np.testing.assert_allclose(np.asarray(y).reshape(-1, m.d_model), want, rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_llama_fields_train_and_a_workdir_from_before_them_resumes(tmp_path, corpus_dir, cache_dir):
    cfg = tiny_overrides(llama_like(dense.get_config("size=tiny")), corpus_dir, cache_dir)
    loop.run(cfg, str(tmp_path / "llama"))
    losses = [r["loss"] for r in read_metrics(str(tmp_path / "llama")) if "loss" in r]
    assert losses[-1] < losses[0] - 0.5, losses
    # A run written before the fields existed: its config.json lacks them.
    w = str(tmp_path / "old")
    loop.run(tiny_overrides(dense.get_config("size=tiny"), corpus_dir, cache_dir, steps=10), w)
    wd = Workdir(w)
    old = json.loads(wd.config_path.read_text())
    for name in ("n_kv_heads", "tie_embeddings", "rope_scaling"):
        old["model"].pop(name)
    old["model"]["ffn"].pop("gated")
    wd.write_checked(wd.config_path, json.dumps(old))
    out = loop.run(tiny_overrides(dense.get_config("size=tiny"), corpus_dir, cache_dir), w)
    assert out["step"] == 20 and jax.numpy.isfinite(out["loss"])
