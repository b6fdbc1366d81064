"""LUT export and offloaded inference: exactness against the in-memory model, bytes accounting,
atomic export, and clear failures for mismatched, incomplete or corrupt stores."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_overrides, trained_workdir

from configs import dense, mole
from mole_jax.errors import DataError, StoreError, UserError
from mole_jax.eval.validation import evaluate
from mole_jax.infer import export as export_lib
from mole_jax.infer.engine import build_engine
from mole_jax.infer.export import export_experts
from mole_jax.infer.generate import generate
from mole_jax.model.config import model_config
from mole_jax.stores.lut import LutStore
from mole_jax.train import loop
from mole_jax.train.metrics import read_metrics
from mole_jax.workdir import Workdir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mole_run(tmp_path_factory, corpus_dir, cache_dir):
    w = trained_workdir(
        tmp_path_factory, mole.get_config("size=tiny,experts=4"), corpus_dir, cache_dir
    )
    export_lib.export_lut(w, dtype="float32")
    return w


def test_offloaded_eval_equals_in_memory_and_training_form(mole_run):
    mem = evaluate(mole_run, n_batches=2)  # train.eval_batches: the run's own windows
    off = evaluate(mole_run, "offload", n_batches=2)
    lut = evaluate(mole_run, "lut_memory", n_batches=2)
    assert abs(off["loss"] - mem["loss"]) <= 1e-5 and abs(lut["loss"] - mem["loss"]) <= 1e-5
    val = [r["val_loss"] for r in read_metrics(mole_run) if "val_loss" in r]
    assert abs(mem["loss"] - val[-1]) <= 1e-5  # the run's own validation loss at step 20
    assert off["lut_dtype"] == "float32" and off["tokens"] == mem["tokens"]
    saved = json.loads(Path(mole_run, "eval", "val_offload.json").read_text())
    assert {
        "loss",
        "ppl",
        "tokens",
        "bytes_read",
        "io_bytes",
        "bytes_per_token",
        "cache_hit_rate",
        "lut_dtype",
        "peak_rss_mb",
    } <= set(saved)
    # The offloaded engine holds only the resident weights: no experts, no LUT.
    assert off["resident_param_bytes"] < mem["resident_param_bytes"]


def test_bytes_per_token_is_layers_experts_d_times_value_bytes(mole_run):
    m = json.loads(Path(mole_run, "lut", "manifest.json").read_text())
    layers, e, d = len(m["layers"]), m["experts"], m["d_model"]
    assert m["bytes_per_token"] == layers * e * d * 4
    engine = build_engine(mole_run, "offload", cache_rows=0)  # no cache: every id is read
    batch = np.array([[3, 5, 3, 9], [9, 9, 1, 3]], np.int32)
    engine.forward(batch)
    assert engine.stats()["rows_read"] == 4  # distinct ids 1, 3, 5, 9
    assert engine.stats()["bytes_read"] == 4 * layers * e * d * 4
    # measured: the rows at least, plus the shard indexes; a request per array at least (rows
    # near each other share one)
    assert engine.stats()["io_bytes"] >= engine.stats()["bytes_read"]
    assert layers <= engine.stats()["io_requests"] <= 4 * layers + layers
    engine.forward(batch)  # without a cache the same rows are read again
    assert engine.stats()["bytes_read"] == 8 * layers * e * d * 4
    cached = build_engine(mole_run, "offload", cache_rows=100)
    cached.forward(batch)
    cached.forward(batch)
    assert cached.stats()["rows_read"] == 4 and cached.stats()["cache_hit_rate"] == 0.5


@pytest.mark.parametrize(
    "dtype,tol",
    [("float16", 1e-4), ("bfloat16", 1e-3), ("int8", 1e-3), ("nf4", 1e-2)],
)
def test_quantised_luts_stay_close(mole_run, dtype, tol):
    """Documented tolerances on |loss(LUT dtype) - loss(float32)| for this tiny model."""
    export_lib.export_lut(mole_run, dtype=dtype, out=f"lut_{dtype}")
    m = json.loads(Path(mole_run, f"lut_{dtype}", "manifest.json").read_text())
    extra = {"int8": m["experts"] * 4, "nf4": m["experts"] * m["d_model"] // 64 * 2}.get(dtype, 0)
    value = {"float16": 2, "bfloat16": 2, "int8": 1, "nf4": 0.5}[dtype]
    assert m["bytes_per_token"] == len(m["layers"]) * (m["experts"] * m["d_model"] * value + extra)
    ref = evaluate(mole_run, write=False)["loss"]
    got = evaluate(mole_run, "offload", write=False, store=f"lut_{dtype}")["loss"]
    assert abs(got - ref) <= tol, (dtype, got, ref)


def test_offloaded_greedy_generation_matches_in_memory(mole_run):
    prompt = [[7, 21, 33, 5, 12]]
    a = generate(build_engine(mole_run, "experts"), prompt, max_new=12)["tokens"]
    b = generate(build_engine(mole_run, "offload"), prompt, max_new=12)["tokens"]
    np.testing.assert_array_equal(a, b)


def test_token_ids_outside_the_vocabulary_are_refused(mole_run):
    engine = build_engine(mole_run, "offload")
    with pytest.raises(DataError, match="outside the vocabulary"):
        engine.forward(np.array([[1, 512]]))


def test_killed_export_leaves_no_complete_store_and_rerun_succeeds(mole_run, monkeypatch):
    w = Path(mole_run)

    def die(self, meta):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(LutStore, "finalize", die)
    with pytest.raises(KeyboardInterrupt):
        export_lib.export_lut(mole_run, dtype="float16", out="lut_killed")
    assert not (w / "lut_killed").exists()
    tmp = list(w.glob(".lut_killed.tmp-*"))
    assert len(tmp) == 1 and not (tmp[0] / "manifest.json").exists()
    with pytest.raises(StoreError, match="manifest.json missing"):
        LutStore.open(tmp[0])
    monkeypatch.undo()
    export_lib.export_lut(mole_run, dtype="float16", out="lut_killed")
    assert (w / "lut_killed" / "manifest.json").exists() and not list(w.glob(".lut_killed.tmp-*"))


def test_a_kill_between_publish_renames_leaves_nothing_behind(mole_run, monkeypatch, capsys):
    """Killed after the old store moved aside and before the new one moved in: the next export
    puts the old store back first (the only complete copy), then publishes; no hidden copy
    stays."""
    from mole_jax.stores import store

    w = Path(mole_run)
    export_lib.export_lut(mole_run, dtype="float16", out="lut_pub")
    before = json.loads((w / "lut_pub" / "manifest.json").read_text())
    calls, replace = [], store.os.replace

    def killed_second(src, dst):
        if Path(dst) == w / "lut_pub" and Path(src).name.startswith(".lut_pub.tmp-"):
            calls.append(dst)  # publish's second rename: the new store into place
            raise KeyboardInterrupt("killed between the renames")
        replace(src, dst)

    monkeypatch.setattr(store.os, "replace", killed_second)
    with pytest.raises(KeyboardInterrupt):
        export_lib.export_lut(mole_run, dtype="float16", out="lut_pub")
    monkeypatch.undo()
    assert calls and not (w / "lut_pub").exists()  # the fault landed where meant
    assert len(list(w.glob(".lut_pub.old-*"))) == 1
    store.staging_dir(w / "lut_pub")  # what the next export does first
    assert "restored it" in capsys.readouterr().out
    assert json.loads((w / "lut_pub" / "manifest.json").read_text()) == before
    export_lib.export_lut(mole_run, dtype="float16", out="lut_pub")
    assert not list(w.glob(".lut_pub.*")) and LutStore.open(w / "lut_pub", verify="full")


def test_export_never_replaces_a_newer_steps_store_with_an_older_one(mole_run, tmp_path, capsys):
    """The newest checkpoint damaged: export falls back to the previous step, but refuses to
    replace the LUT of the newer step with it (one line); --step replaces it when asked."""
    w = tmp_path / "w"
    shutil.copytree(mole_run, w)
    cfg = Workdir(w).editable_config()
    cfg.train.steps += 2
    loop.run(cfg, str(w))  # a second checkpoint, then its LUT
    export_lib.export_lut(w, dtype="float32")
    steps = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
    before = (w / "lut" / "manifest.json").read_text()
    assert len(steps) >= 2 and json.loads(before)["checkpoint_step"] == steps[-1]
    files = [p for p in (w / "checkpoints" / str(steps[-1]) / "params").rglob("*") if p.is_file()]
    data = max(files, key=lambda p: p.stat().st_size)  # the parameters' data
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=f"newer than step {steps[-2]}"):
        export_lib.export_lut(w, dtype="float32")
    assert "unreadable or corrupt" in capsys.readouterr().out  # the damage was found
    assert (w / "lut" / "manifest.json").read_text() == before
    got = export_lib.export_lut(w, dtype="float32", step=steps[-2])
    assert got["checkpoint_step"] == steps[-2]


def _copy_store(mole_run, name):
    dst = Path(mole_run) / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(Path(mole_run) / "lut", dst)
    return dst


def test_missing_array_and_flipped_byte_fail_clearly(mole_run):
    broken = _copy_store(mole_run, "lut_missing")
    shutil.rmtree(broken / "layer_01" / "values")
    with pytest.raises(StoreError, match="layer_01/values is missing or unreadable"):
        build_engine(mole_run, "offload", store="lut_missing")
    flipped = _copy_store(mole_run, "lut_flipped")
    shard = max(
        (
            p
            for p in (flipped / "layer_00" / "values").rglob("*")
            if p.is_file() and p.name != "zarr.json"
        ),
        key=lambda p: p.stat().st_size,
    )
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="layer_00/values is corrupt"):
        build_engine(mole_run, "offload", store="lut_flipped")  # small store: verified on open
    # Without the up-front check, the read that touches the byte fails on its crc32c.
    engine = build_engine(mole_run, "offload", store="lut_flipped", verify="none")
    with pytest.raises(StoreError, match="the store is corrupt"):
        for start in range(0, 512, 64):
            engine.forward(np.arange(start, start + 64, dtype=np.int32)[None])


def test_a_missing_shard_is_an_error_never_zero_rows(mole_run, monkeypatch):
    """A deleted shard file of a store too large to hash at open (or opened unverified) fails
    the read that needs it; tensorstore would otherwise read its rows as zeros."""
    broken = _copy_store(mole_run, "lut_shard")
    shards = [p for p in (broken / "layer_00" / "values").rglob("*") if p.is_file()]
    shards = [p for p in shards if p.name != "zarr.json"]
    assert shards
    for p in shards:
        p.unlink()
    assert not any(p.name != "zarr.json" for p in (broken / "layer_00").rglob("*") if p.is_file())
    monkeypatch.setattr("mole_jax.stores.store.VERIFY_AUTO_BYTES", 0)  # a paper-size store
    for verify in ("auto", "none"):
        store = LutStore.open(broken, verify=verify)
        with pytest.raises(StoreError, match="layer_00/values"):
            store.read_rows(np.arange(8))


def test_store_from_another_checkpoint_is_refused(mole_run, corpus_dir, cache_dir, tmp_path):
    w = str(tmp_path / "w")
    shutil.copytree(mole_run, w)
    cfg = tiny_overrides(
        mole.get_config("size=tiny,experts=4"),
        corpus_dir,
        cache_dir,
        steps=24,
        eval_every=20,
        ckpt_every=20,
    )
    loop.run(cfg, w)  # a newer checkpoint (step 24); lut/ still holds step 20's tables
    with pytest.raises(StoreError, match="does not match the checkpoint: its params_digest"):
        build_engine(w, "offload")
    assert abs(evaluate(w, "offload", step=20)["loss"] - evaluate(w, step=20)["loss"]) <= 1e-5


def test_export_refuses_non_mole_and_hidden_input(corpus_dir, cache_dir, tmp_path):
    for module, arg, match in [
        (dense, "size=tiny", "only MoLE experts become lookup tables"),
        (mole, "size=tiny,input=hidden", "experts read the hidden state"),
    ]:
        w = str(tmp_path / arg.replace(",", "_"))
        cfg = tiny_overrides(
            module.get_config(arg), corpus_dir, cache_dir, steps=2, eval_every=2, ckpt_every=2
        )
        loop.run(cfg, w)
        with pytest.raises(UserError, match=match):
            export_lib.export_lut(w)
        with pytest.raises(UserError, match="only MoE experts are offloaded"):
            export_experts(w)
        assert not (Path(w) / "lut").exists() and not (Path(w) / "experts").exists()


def test_a_bfloat16_run_exports_its_lut_computed_in_float32(
    tmp_path_factory, corpus_dir, cache_dir
):
    """The official export computes the table in float32 and rounds once; computing it in the
    run's bfloat16 would be ~1e-2 off. The float32 LUT of a bfloat16 run equals the float32
    model's table (same weights) and not the bfloat16 one."""
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from mole_jax.train.checkpoint import restore_model
    from mole_jax.workdir import Workdir

    cfg = mole.get_config("size=tiny,experts=4")
    cfg.model.dtype = "bfloat16"
    w = trained_workdir(tmp_path_factory, cfg, corpus_dir, cache_dir, steps=10)
    m = export_lib.export_lut(w, dtype="float32")
    ids = np.arange(64, dtype=np.int32)
    layer = m["layers"][0]
    got = LutStore.open(Path(w, "lut")).read_rows(ids)[layer]["values"]
    mcfg = model_config(Workdir(w).config)
    tables = {}
    for dt in ("float32", "bfloat16"):
        r = restore_model(w, dataclasses.replace(mcfg, dtype=dt))
        model = nnx.merge(r.graphdef, r.params, r.rest)
        tables[dt] = np.asarray(model.token_tables(jnp.asarray(ids), [layer])[layer], np.float32)
    np.testing.assert_allclose(got, tables["float32"], rtol=1e-6, atol=1e-6)
    assert np.abs(got - tables["bfloat16"]).max() > 1e-4


def test_an_nf3_lut_stays_close_and_counts_its_bytes(tmp_path_factory, corpus_dir, cache_dir):
    """NF3 (Table 8: block 128; 32 here, d_model being 64): 3-bit codes, 8 to 3 bytes, one
    float16 absmax per block; offloaded loss within 3e-2 of the float32 LUT's on the tiny model."""
    cfg = mole.get_config("size=tiny,experts=4")
    cfg.unlock()
    cfg.model.ffn.mole.nf3_block = 32
    w = trained_workdir(tmp_path_factory, cfg, corpus_dir, cache_dir)
    m = export_lib.export_lut(w, dtype="nf3", out="lut_nf3")
    e, d = m["experts"], m["d_model"]
    assert m["bytes_per_token"] == len(m["layers"]) * (e * d * 3 // 8 + e * d // 32 * 2)
    ref = evaluate(w, write=False)["loss"]
    got = evaluate(w, "offload", write=False, store="lut_nf3")["loss"]
    assert abs(got - ref) <= 3e-2, (got, ref)
    with pytest.raises(UserError, match="nf3_block=48 must be even and divide d_model=64"):
        cfg2 = mole.get_config("size=tiny,experts=4")
        cfg2.unlock()
        cfg2.model.ffn.mole.nf3_block = 48  # does not divide D = 64
        w2 = trained_workdir(tmp_path_factory, cfg2, corpus_dir, cache_dir, steps=2)
        export_lib.export_lut(w2, dtype="nf3")
