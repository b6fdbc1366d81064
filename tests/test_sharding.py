"""Sharded training on 8 host devices equals one device, and so do scanned layers
(`model.scan_layers`): every kind, several meshes, resumed runs; parameters and optimiser state
really are split; the rules table and mesh validation."""

import jax
import numpy as np
import pytest
from conftest import tiny_overrides
from jax.sharding import PartitionSpec as P

from configs import dense, moe, mole, peer, pkm, pregated
from mole_jax.data import pipeline
from mole_jax.errors import ConfigError
from mole_jax.parallel.sharding import logical_spec, make_mesh, mesh_shape
from mole_jax.train import loop
from mole_jax.train.metrics import read_metrics
from mole_jax.train.trainer import setup
from mole_jax.train.validate import validate

KINDS = {
    "dense": (dense, "size=tiny"),
    "moe": (moe, "size=tiny,experts=4,topk=2"),
    "moe-ec": (moe, "size=tiny,experts=4,topk=2,routing=expert_choice"),
    "peer": (peer, "size=tiny,keys=16,heads=2,topk=4"),
    "pkm": (pkm, "size=tiny,keys=16,heads=2,topk=4"),
    "mole": (mole, "size=tiny,experts=4"),
    "moe-swiglu": (moe, "size=tiny,experts=4,topk=2"),  # model.ffn.gated: [gate | up] experts
    "pregated-swiglu": (pregated, "size=tiny,experts=4,permanent=1"),
}
MESHES = {"fsdp2-tensor2-expert2": dict(fsdp=2, tensor=2, expert=2, data=1), "fsdp8": dict(fsdp=8)}
# The three-axis mesh for every kind; fsdp=8 (the batch in 8 pieces) for the kinds whose
# statistics span the batch: PEER's BatchNorm, expert choice, and dense as the baseline.
FSDP8 = ("dense", "peer", "moe-ec")


def config(kind, corpus_dir, cache_dir, mesh=None):
    module, arg = KINDS[kind]
    cfg = tiny_overrides(module.get_config(arg), corpus_dir, cache_dir, steps=10)
    cfg.unlock()
    cfg.mesh.update(dict(data=-1, fsdp=1, tensor=1, expert=1))
    cfg.mesh.update(mesh or {})
    if kind.endswith("-swiglu"):
        cfg.model.ffn.gated, cfg.model.activation = True, "silu"
    return cfg


def train_losses(cfg, devices, steps=10):
    """Per-step losses and the final state of `steps` steps on a mesh over `devices`."""
    tr = setup(cfg, mesh=make_mesh(cfg.mesh, devices))
    td = pipeline.prepare(cfg)
    t = cfg.train
    state, losses = tr.init_state(), []
    rows = tr.process_rows(t.batch_size)
    for s in range(steps):
        batch = pipeline.train_batch(td.train, cfg.seed, s, t.batch_size, cfg.data.seq_len, rows)
        state, mets = tr.step_fn(state, *tr.put_batch(batch))
        losses.append(float(mets["loss"]))
    return np.array(losses), state


def scanned(cfg, **model):
    cfg.unlock()
    cfg.model.update(dict(scan_layers=True, **model))
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_sharded_and_scanned_training_equal_one_device(kind, corpus_dir, cache_dir):
    one, one_state = train_losses(config(kind, corpus_dir, cache_dir), jax.devices()[:1])
    assert one[-1] < one[0]
    for name, mesh in MESHES.items():
        if name == "fsdp8" and kind not in FSDP8:
            continue
        got, _ = train_losses(config(kind, corpus_dir, cache_dir, mesh), jax.devices())
        np.testing.assert_allclose(got, one, rtol=1e-5, err_msg=f"{kind} on {name}")
    got, state = train_losses(scanned(config(kind, corpus_dir, cache_dir)), jax.devices()[:1])
    np.testing.assert_allclose(got, one, rtol=1e-5, err_msg=f"{kind} scanned")
    leaves = jax.tree.leaves(one_state["rest"]), jax.tree.leaves(state["rest"])
    for a, b in zip(*leaves, strict=True):  # PEER's BatchNorm statistics moved the same way
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    assert kind != "peer" or leaves[1]


@pytest.mark.slow
def test_parameters_and_optimiser_state_are_split(corpus_dir, cache_dir):
    cfg = config("dense", corpus_dir, cache_dir, dict(fsdp=8))
    tr = setup(cfg)
    state = tr.init_state()
    device = jax.devices()[0]
    for part in ("params", "opt_state"):
        leaves = jax.tree.leaves(state[part])
        total = sum(x.nbytes for x in leaves)
        here = sum(
            s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == device
        )
        vectors = sum(x.nbytes for x in leaves if x.ndim <= 1)  # norms and counts: replicated
        assert here <= total / 8 + vectors, (part, here, total)
    up = state["params"]["blocks"][0]["ffn"]["mlp"]["up"]["kernel"]
    assert up.sharding.spec == P("fsdp", None)  # embed over fsdp; mlp's tensor axis is size 1


@pytest.mark.slow
def test_resumed_sharded_run_continues_the_same_curve(corpus_dir, cache_dir, tmp_path):
    cfg = config("moe", corpus_dir, cache_dir, MESHES["fsdp2-tensor2-expert2"])
    cfg.train.update(dict(steps=12, ckpt_every=4, eval_every=6))
    full, broken = str(tmp_path / "full"), str(tmp_path / "broken")
    loop.run(cfg, full)

    def crash(step, row):
        if step == 7:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        loop.run(cfg, broken, on_row=(crash,))
    loop.run(cfg, broken)
    curve = lambda w: {r["step"]: r["loss"] for r in read_metrics(w) if "loss" in r}
    assert curve(broken) == curve(full)


def test_rules_table_and_mesh_validation():
    mesh = make_mesh(dict(data=1, fsdp=2, expert=2, tensor=2))
    assert logical_spec(("batch", "length", "embed"), mesh) == P(("fsdp", "expert"), None, None)
    assert logical_spec(("experts", "embed", "mlp"), mesh) == P("expert", "fsdp", "tensor")
    assert logical_spec(("rows", "embed"), mesh) == P(("expert", "fsdp"), None)
    assert logical_spec(("vocab", "embed"), mesh) == P("tensor", "fsdp")
    assert mesh_shape(dict(data=-1, fsdp=2, expert=1, tensor=1), 8)["data"] == 4
    with pytest.raises(ConfigError, match="mesh data=1, fsdp=3"):
        mesh_shape(dict(data=1, fsdp=3, expert=1, tensor=1), 8)
    with pytest.raises(ConfigError, match="both -1"):
        mesh_shape(dict(data=-1, fsdp=-1, expert=1, tensor=1), 8)
    cfg = dense.get_config("size=tiny")
    cfg.mesh.fsdp = 8
    cfg.train.batch_size = 12
    with pytest.raises(ConfigError, match="divisible by the 8 devices that split the batch"):
        validate(cfg, n_devices=8)
