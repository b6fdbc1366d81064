"""Every FFN kind trains on text (the tests' own corpus) with a falling loss and finite aux
values, and its model_summary.json follows the accounting formulas."""

import json
import math

import numpy as np
import pytest
from conftest import tiny_overrides

from configs import dense, moe, mole, peer, pkm, pregated
from mole_jax.eval.validation import evaluate
from mole_jax.train import loop
from mole_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow

KINDS = {
    "moe": (moe, "size=tiny,experts=4,topk=2", ("lb_loss", "z_loss")),
    "peer": (peer, "size=tiny,keys=64,heads=4,topk=8", ("usage", "unevenness")),
    "pkm": (pkm, "size=tiny,keys=64,heads=4,topk=8", ("usage", "unevenness")),
    "mole": (mole, "size=tiny,experts=4", ()),
    "pregated": (pregated, "size=tiny,experts=4", ("lb_loss", "z_loss")),
    "dense": (dense, "size=tiny", ()),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_kind_trains_on_text(kind, tmp_path, corpus_dir, cache_dir):
    module, arg, stats = KINDS[kind]
    cfg = tiny_overrides(
        module.get_config(arg), corpus_dir, cache_dir, steps=30, eval_every=30, ckpt_every=30
    )
    w = str(tmp_path / kind)
    loop.run(cfg, w)
    rows = [r for r in read_metrics(w) if "loss" in r]
    first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-5:]])
    assert last < first - 1.0, (first, last)
    for name in stats + ("aux_loss",):
        assert all(math.isfinite(r[name]) for r in rows), name
    if kind in ("moe", "mole", "pregated"):
        load = rows[-1]["expert_load/l0"]
        assert len(load) == 4 and abs(sum(load) - 1) < 1e-4
    s = json.load(open(f"{w}/model_summary.json"))
    assert s["kind"] == kind and s["params_total"] == s["params_total_formula"]
    assert s["params_active_per_token"] <= s["params_total"]
    # `launch.py eval` of the checkpoint reproduces the run's own validation loss (for PEER this
    # needs the BatchNorm running statistics restored with the parameters).
    val = [r["val_loss"] for r in read_metrics(w) if "val_loss" in r][-1]
    out = evaluate(w, write=False, n_batches=2)
    assert abs(out["loss"] - val) <= 1e-5
    if kind in ("peer", "pkm"):  # usage and unevenness over the whole evaluation (PEER Table 2)
        _check_usage_over_the_evaluation(w, out)


def _check_usage_over_the_evaluation(w, out):
    from mole_jax.eval.validation import val_batches
    from mole_jax.infer.engine import build_engine
    from mole_jax.model.ffn.peer import usage_from_mass

    engine = build_engine(w)
    (layer,) = engine.model_config.ffn_layers  # the middle block
    total, per_batch = None, []
    for b in val_batches(w, n_batches=2):
        engine.reset_stats()
        engine.forward(b[:, :-1])
        mass = np.asarray(engine._mass[layer])  # float32, summed as the engine sums it
        total = mass if total is None else total + mass
        per_batch.append(float(usage_from_mass(mass.astype(np.float64))[0]))
    usage, unevenness = usage_from_mass(total.astype(np.float64))
    assert out[f"usage/l{layer}"] == pytest.approx(float(usage), rel=1e-9)
    assert out[f"unevenness/l{layer}"] == pytest.approx(float(unevenness), rel=1e-9)
    assert max(per_batch) <= out[f"usage/l{layer}"] <= 1  # the set's usage covers each batch's
