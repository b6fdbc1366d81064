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


@pytest.mark.parametrize("module,arg", [(moe, "size=tiny"), (mole, "size=tiny,experts=4"),
                                        (pregated, "size=tiny")])  # fmt: skip
def test_gated_experts_count_exactly_and_equal_their_loop(module, arg):
    """A gated routed expert is down(act(gate x) * up x): the stacked [gate | up] layout of
    every kind against a loop over one expert's halves."""
    cfg = module.get_config(arg)
    cfg.model.ffn.gated, cfg.model.activation = True, "silu"
    m = validate(cfg, n_devices=1)
    s = accounting.summarize(cfg, 1)
    assert s["params_total"] == s["params_total_formula"]
    layer = build_model(m).blocks[0].ffn
    up, down = np.asarray(layer.up[...]), np.asarray(layer.down[...])
    f = down.shape[1]
    assert up.shape[-1] == 2 * f
    x = np.random.default_rng(0).normal(size=(5, m.d_model)).astype(np.float32)
    e = 1
    want = (jax.nn.silu(x @ up[e, :, :f]) * (x @ up[e, :, f:])) @ down[e]
    got = np.asarray(layer.act(jnp.asarray(x @ up[e])) @ down[e])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


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
