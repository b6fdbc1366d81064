"""Read-ME's dense -> pre-gated conversion: before any tuning, experts that together hold every
channel reproduce the dense model's logits; channel selection by hand; the command end to end."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, trained_workdir
from flax import nnx

from configs import dense, pregated
from mole_jax.model.backbone import build_model
from mole_jax.model.config import model_config
from mole_jax.train.convert import converted_params, select_channels


def small(module, arg):
    cfg = module.get_config(arg)
    cfg.unlock()
    cfg.model.vocab_size = cfg.data.vocab_size = 256
    return cfg


def test_selection_by_hand():
    imp = np.zeros((2, 1, 6))
    imp[0, 0] = [9, 1, 5, 0, 2, 3]  # domain 0
    imp[1, 0] = [9, 4, 0, 6, 2, 1]  # domain 1; summed: 18, 5, 5, 6, 4, 4
    perm, experts = select_channels(imp, permanent=1, width=2)
    assert perm.tolist() == [[0]]
    assert experts[0, 0].tolist() == [2, 5] and experts[1, 0].tolist() == [1, 3]


def gated(cfg):
    cfg.model.ffn.gated, cfg.model.activation = True, "silu"
    return cfg


@pytest.mark.parametrize("permanent,swiglu", [(0, False), (64, False), (64, True)])
def test_experts_holding_every_channel_reproduce_the_dense_logits(permanent, swiglu):
    """(swiglu: a Llama-style gated dense FFN becomes SwiGLU experts, gate sliced with up.)"""
    shape = gated if swiglu else (lambda c: c)
    md = model_config(shape(small(dense, "size=tiny")))
    d_params = nnx.to_pure_dict(nnx.state(build_model(md, seed=4), nnx.Param))
    cfg = shape(small(pregated, "size=tiny,convert=1,topk=1"))
    cfg.model.ffn.pregated.update(dict(permanent=permanent, d_expert=256 - permanent))
    m = model_config(cfg)
    imp = np.random.default_rng(0).random((3, md.n_layers, 256))
    perm, experts = select_channels(imp, permanent, 256 - permanent)
    model = build_model(m, seed=1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = converted_params(nnx.to_pure_dict(params), d_params, perm, experts)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 16)), jnp.int32)
    got = nnx.merge(graphdef, params, rest)(ids).logits_BxLxV
    graph_d, _, rest_d = nnx.split(build_model(md), nnx.Param, ...)
    want = nnx.merge(graph_d, d_params, rest_d)(ids).logits_BxLxV
    # the same channels summed in another order: float32 rounding only
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    assert float(jnp.abs(want).max()) > 1e-2
    # an expert missing channels no longer does
    cfg.model.ffn.pregated.update(dict(d_expert=128 - permanent // 2))
    perm2, experts2 = select_channels(imp, permanent, 128 - permanent // 2)
    g2, p2, r2 = nnx.split(build_model(model_config(cfg), seed=1), nnx.Param, ...)
    p2 = converted_params(nnx.to_pure_dict(p2), d_params, perm2, experts2)
    assert float(jnp.abs(nnx.merge(g2, p2, r2)(ids).logits_BxLxV - want).max()) > 1e-4


@pytest.mark.slow
def test_convert_command_writes_an_ordinary_workdir(tmp_path_factory, corpus_dir, cache_dir):
    src = trained_workdir(tmp_path_factory, dense.get_config("size=tiny"), corpus_dir, cache_dir,
                          steps=10)  # fmt: skip
    w = str(tmp_path_factory.mktemp("pg") / "w")
    domains = [f"files:{corpus_dir}/doc0[0-5].txt", f"files:{corpus_dir}/doc0[6-9].txt"]
    cmd = [sys.executable, f"{ROOT}/launch.py", "convert", f"--from={src}", f"--workdir={w}",
           "--config=configs/pregated.py:size=tiny,convert=1,experts=2,permanent=1",
           f"--config.convert.domains={','.join(domains)}", "--config.convert.rounds=1",
           "--config.convert.router_steps=12", "--config.convert.expert_steps=6",
           "--config.convert.calib_windows=4", "--config.model.vocab_size=512",
           "--config.train.batch_size=8"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.load(open(f"{w}/convert.json"))
    d = rec["rounds"][0]["distill"]
    assert d["last"] < d["first"]  # the router learns the overlap targets
    # permanent 64 channels + two experts of 64 from the other 192 (the domains may share some)
    assert rec["permanent_channels"] == rec["expert_channels"] == 64
    assert all(128 <= c <= 192 for c in rec["channels_covered"])
    ev = subprocess.run([sys.executable, f"{ROOT}/launch.py", "eval", f"--workdir={w}"],
                        capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert ev.returncode == 0, ev.stderr[-3000:]
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 2 and again.stderr.startswith("error:")
    # killed after the checkpoint, before convert.json: the next convert starts over, cleanly
    os.remove(f"{w}/convert.json")
    open(f"{w}/convert.partial", "w").close()
    redo = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert json.load(open(f"{w}/convert.json")) == rec  # the same conversion, deterministic
    assert not os.path.exists(f"{w}/convert.partial")
    # ... but not once it was trained on (a step after 0): nothing is deleted
    os.remove(f"{w}/convert.json")
    open(f"{w}/convert.partial", "w").close()
    os.mkdir(f"{w}/checkpoints/5")
    refused = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and refused.stderr.startswith("error:")
    assert sorted(os.listdir(f"{w}/checkpoints")) == ["0", "5"]
