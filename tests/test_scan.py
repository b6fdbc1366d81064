"""`model.scan_layers`: scanned blocks train exactly as the layer loop (every kind: in
test_sharding.py; here token tables per micro-batch under remat, sharded), and only identical
blocks share a scan."""

import jax
import numpy as np
import pytest
from test_sharding import MESHES, config, scanned, train_losses

from configs import dense, moe, mole
from mole_jax.data.dedup import dedup_ids
from mole_jax.model import backbone as model_lib
from mole_jax.model.config import model_config
from mole_jax.model.scan import runs_of_identical


@pytest.mark.slow
def test_scanned_mole_per_microbatch_tables_under_remat_and_sharded(corpus_dir, cache_dir):
    def cfg(mesh=None):
        c = config("mole", corpus_dir, cache_dir, mesh)
        c.train.update(dict(microbatches=2, token_tables="microbatch"))
        c.model.remat = "full"
        return c

    loop, _ = train_losses(cfg(), jax.devices()[:1], steps=6)
    got, _ = train_losses(scanned(cfg()), jax.devices()[:1], steps=6)
    np.testing.assert_allclose(got, loop, rtol=1e-5)
    sharded, _ = train_losses(scanned(cfg(MESHES["fsdp2-tensor2-expert2"])), jax.devices(), 6)
    np.testing.assert_allclose(sharded, loop, rtol=1e-5)


def test_only_identical_blocks_share_a_scan():
    def runs(layers):
        cfg = moe.get_config("size=tiny,experts=4,topk=2")
        cfg.model.ffn.layers = layers
        m = model_config(cfg)
        return runs_of_identical(model_lib.abstract_model(m).blocks)

    n = moe.get_config("size=tiny,experts=4,topk=2").model.n_layers
    assert runs("all") == [list(range(n))]
    assert runs("every_2") == [[i] for i in range(n)]  # dense, MoE, dense, ...
    assert runs("none") == [list(range(n))]


def test_a_scanned_model_compiles_one_scan_over_its_blocks():
    cfg = dense.get_config("size=tiny")
    cfg.model.scan_layers = True
    model = model_lib.build_model(model_config(cfg))
    ids = jax.numpy.zeros((1, 8), jax.numpy.int32)
    jaxpr = str(jax.make_jaxpr(lambda: model(ids).logits_BxLxV)())
    assert jaxpr.count(" scan[") == 1 and f"length={cfg.model.n_layers}" in jaxpr


def test_tables_handed_in_are_scanned_with_their_layers():
    """The LUT engines hand every layer's rows in: the scan stacks them with their blocks."""
    cfg = mole.get_config("size=tiny,experts=4")
    ids = jax.random.randint(jax.random.key(0), (2, 16), 0, cfg.model.vocab_size)
    uniq, inv = dedup_ids(ids, cfg.model.vocab_size)
    logits = []
    for scan in (False, True):
        cfg.model.scan_layers = scan
        model = model_lib.build_model(model_config(cfg))
        tables = model.token_tables(uniq[None])
        logits.append(model(ids, tables=tables, inv_BxL=inv).logits_BxLxV)
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5, atol=1e-6)
