"""MoE expert-offloading baseline: the layer-by-layer offloaded decode equals the in-memory MoE,
the LRU cache and the byte counts behave as specified, and bad stores are refused."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import trained_workdir

from configs import moe
from mole_jax.errors import StoreError, UserError
from mole_jax.infer.engine import build_engine
from mole_jax.infer.export import export_experts
from mole_jax.infer.generate import generate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, corpus_dir, cache_dir):
    w = trained_workdir(
        tmp_path_factory,
        moe.get_config("size=tiny,experts=6,topk=2,shared=1"),
        corpus_dir,
        cache_dir,
    )
    export_experts(w, dtype="float32")
    return w


@pytest.mark.parametrize(
    "capacity,prefetch,k,ahead", [(0, False, None, 1), (2, True, None, 1), (6, False, None, 1),
                                  (0, True, 1, 2), (2, True, 1, 1)]
)  # fmt: skip
def test_offloaded_moe_equals_in_memory(moe_run, capacity, prefetch, k, ahead):
    ref = build_engine(moe_run, "experts")
    eng = build_engine(moe_run, "moe_offload", capacity=capacity, prefetch=prefetch,
                       prefetch_k=k, lookahead=ahead)  # fmt: skip
    ids = np.random.default_rng(1).integers(0, ref.cfg.model.vocab_size, (3, 10))
    want, _ = ref.forward(ids)
    got, _ = eng.forward(ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    a, b = generate(ref, ids, 8), generate(eng, ids, 8)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_cache_and_byte_accounting(moe_run):
    manifest = json.loads(Path(moe_run, "experts", "manifest.json").read_text())
    d, f = manifest["d_model"], manifest["d_expert"]
    assert manifest["bytes_per_expert"] == 2 * d * f * 4
    ids = np.array([[5, 17, 5, 99]], np.int32)
    cold = build_engine(moe_run, "moe_offload", capacity=0)
    cold.forward(ids)
    cold.forward(ids)
    s = cold.stats()
    assert s["hits"] == 0 and s["experts_read"] == s["lookups"]  # no cache: all lookups read
    assert s["bytes_read"] == s["lookups"] * manifest["bytes_per_expert"]
    warm = build_engine(moe_run, "moe_offload", capacity=manifest["experts"])
    warm.forward(ids)
    first = warm.stats()["experts_read"]
    warm.forward(ids)  # the same tokens route to the same experts, all now cached
    assert warm.stats()["experts_read"] == first and warm.stats()["hits"] == first
    assert warm.stats()["cache_hit_rate"] == 0.5
    assert all(len(c) <= manifest["experts"] for c in warm.cache.values())
    one = build_engine(moe_run, "moe_offload", capacity=1)
    one.forward(np.arange(40, dtype=np.int32)[None])
    assert all(len(c) == 1 for c in one.cache.values())  # LRU bounded by its capacity


def test_expert_recall_counts_what_was_resident_or_on_its_way(moe_run):
    ids = np.random.default_rng(3).integers(0, 512, (1, 16))
    none = build_engine(moe_run, "moe_offload", capacity=0)
    none.forward(ids)
    assert none.stats()["expert_recall"] == 0  # nothing cached, nothing guessed
    full = build_engine(moe_run, "moe_offload", capacity=6)
    full.forward(ids)
    full.reset_stats()
    full.forward(ids)
    full.forward(ids)  # second call: every needed expert is cached
    s = full.stats()
    assert s["expert_recall"] == s["cache_hit_rate"] == 0.5
    guess = build_engine(moe_run, "moe_offload", capacity=0, prefetch=True)
    guess.forward(ids)
    g = guess.stats()
    # with no cache, what was ready is exactly what the guess named (layers after the first)
    assert 0 < g["expert_recall"] == g["prefetch_recall"] <= 1
    assert g["experts_read"] >= g["lookups"] - g["predicted"]
    naive = build_engine(moe_run, "moe_offload", capacity=0, load_all=True)
    naive.forward(ids)
    n = naive.stats()
    layers = len(naive.moe_layers)
    assert (
        n["experts_read"] == layers * 6 and n["bytes_read"] == layers * 6 * naive.store.expert_bytes
    )
    with pytest.raises(UserError, match="prefetch_k"):
        build_engine(moe_run, "moe_offload", prefetch=True, prefetch_k=3)


def test_resident_bytes_exclude_the_experts(moe_run):
    ref = build_engine(moe_run, "experts")
    eng = build_engine(moe_run, "moe_offload", capacity=0)
    m = json.loads(Path(moe_run, "experts", "manifest.json").read_text())
    all_experts = len(m["layers"]) * m["experts"] * m["bytes_per_expert"]
    assert eng.resident_bytes() == ref.resident_bytes() - all_experts


def test_bad_expert_stores_are_refused(moe_run, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(moe_run, w)
    with pytest.raises(StoreError, match="expert store .* does not match the checkpoint"):
        manifest = json.loads((w / "experts" / "manifest.json").read_text())
        manifest["params_digest"] = "0" * 64
        (w / "experts" / "manifest.json").write_text(json.dumps(manifest))
        build_engine(str(w), "moe_offload")
    shutil.rmtree(w / "experts")
    with pytest.raises(StoreError, match="no expert store"):
        build_engine(str(w), "moe_offload")
    with pytest.raises(UserError, match="float32|float16|bfloat16"):
        export_experts(str(w), dtype="int8")
    assert not (w / "experts").exists()


@pytest.mark.parametrize("capacity", [2, 4])
def test_recorded_trace_replays_to_the_engines_own_lru_hits(moe_run, capacity):
    from mole_jax.infer.offload.policies import simulate

    eng = build_engine(moe_run, "moe_offload", capacity=capacity, record=True)
    ids = np.random.default_rng(2).integers(0, eng.cfg.model.vocab_size, (1, 6))
    generate(eng, ids, 10)  # prefill + 9 forward calls (the 10th token needs none), one step each
    assert all(len(t) == 10 for t in eng.trace.values())
    assert all(1 <= len(s) <= 2 for t in eng.trace.values() for s in t[1:])  # top-2, one token
    hits = sum(simulate(t, capacity, "lru")["hits"] for t in eng.trace.values())
    assert hits == eng.stats()["hits"] and eng.stats()["hits"] > 0


@pytest.mark.parametrize("dtype", ["int4", "int3", "int2"])
def test_quantised_expert_store_equals_the_model_with_dequantised_experts(moe_run, dtype):
    """An int4/3/2 store read by the offload engine gives the logits of the in-memory model whose
    routed experts are replaced by their quantise -> dequantise round trip; bytes as stored."""
    from mole_jax.stores import quant

    m = export_experts(moe_run, dtype=dtype, out=f"experts_{dtype}")
    bits, g = quant.GROUP_DTYPES[dtype]
    d, f = m["d_model"], m["d_expert"]
    assert m["bytes_per_expert"] == d * (f * bits // 8 + 4 * f // g) + f * (
        d * bits // 8 + 4 * d // g
    )
    ref = build_engine(moe_run, "experts")
    for i in m["layers"]:
        ffn = ref.params["blocks"][i]["ffn"]
        for name in ("up", "down"):
            w = np.asarray(ffn[name])
            ffn[name] = quant.group_dequantize(quant.group_quantize(w, dtype), dtype)
            err = np.sqrt(np.mean((np.asarray(ffn[name]) - w) ** 2) / np.mean(w**2))
            assert 0 < err < {"int4": 0.15, "int3": 0.3, "int2": 0.5}[dtype]
    eng = build_engine(moe_run, "moe_offload", store=f"experts_{dtype}", capacity=2, prefetch=True)
    ids = np.random.default_rng(2).integers(0, ref.cfg.model.vocab_size, (2, 12))
    want, _ = ref.forward(ids)
    got, _ = eng.forward(ids)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    s = eng.stats()
    assert s["bytes_read"] == s["experts_read"] * m["bytes_per_expert"] > 0


def test_expert_choice_moe_trains_evaluates_and_refuses_decoding(tmp_path_factory, corpus_dir,
                                                                 cache_dir):  # fmt: skip
    import subprocess
    import sys

    from conftest import ROOT

    cfg = moe.get_config("size=tiny,experts=4,topk=2,routing=expert_choice")
    w = trained_workdir(tmp_path_factory, cfg, corpus_dir, cache_dir, steps=10)
    ids = np.random.default_rng(0).integers(0, 512, (2, 17))
    assert np.isfinite(build_engine(w, "experts").loss(ids))  # teacher-forced evaluation works
    for args in (["generate", "--prompt=The king"], ["eval", "--offload"]):
        cmd = [sys.executable, f"{ROOT}/launch.py", args[0], f"--workdir={w}", *args[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith("error:") and "needs a causal model" in lines[0]
