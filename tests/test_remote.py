"""Stores in object storage, against real servers on 127.0.0.1 started here: moto's S3 server
(a process) and a Range-capable HTTP server. Export to S3, read from S3 and HTTP with the losses
of the local store; one request per token with the packed layout; each failure (a deleted
chunk, a replaced shard, an unreachable endpoint, a missing credential) one line, nothing served
wrong."""

import json
import os
import sys
import time

import numpy as np
import pytest
import tensorstore as ts
from conftest import ROOT, run_bounded, trained_workdir

from configs import moe, mole
from experiments._servers import free_port, http_server, s3_server
from mole_jax.errors import StoreError, UserError
from mole_jax.eval.validation import evaluate
from mole_jax.infer.engine import build_engine
from mole_jax.infer.export import export_experts, export_lut
from mole_jax.stores import remote
from mole_jax.stores.location import context, io_counters, location, redact
from mole_jax.stores.lut import LutStore
from mole_jax.stores.store import Staging

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3():
    with s3_server("stores") as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def mole_run(tmp_path_factory, corpus_dir, cache_dir):
    w = trained_workdir(tmp_path_factory, mole.get_config("size=tiny,experts=4"), corpus_dir,
                        cache_dir)  # fmt: skip
    export_lut(w, dtype="float16")
    export_lut(w, dtype="float16", out="lut_packed", layout="packed")
    return w


def _kv(url: str) -> ts.KvStore:
    return ts.KvStore.open(location(url).kvstore(), context=context()).result()


def test_s3_and_http_stores_give_the_local_loss(s3, mole_run):
    local = evaluate(mole_run, "offload", n_batches=2)
    m = export_lut(mole_run, dtype="float16", out="s3://stores/run/lut")
    assert m["layout"] == "packed" and m["prefix"].startswith("data-") and m["generations"]
    remote = evaluate(mole_run, "offload", n_batches=2, store="s3://stores/run/lut")
    assert remote["loss"] == local["loss"] and remote["tokens"] == local["tokens"]
    with http_server(mole_run) as (url, counts):
        for name in ("lut", "lut_packed"):
            got = evaluate(mole_run, "offload", n_batches=2, store=f"{url}/{name}")
            assert got["loss"] == local["loss"], name
        assert counts["requests"] > 0
    # the store's rows, bit for bit
    ids = np.arange(0, 512, 7)
    want = LutStore.open(f"{mole_run}/lut").read_packed(ids)
    assert np.array_equal(LutStore.open("s3://stores/run/lut").read_packed(ids), want)


def test_a_copy_of_a_remote_store_opens_elsewhere(s3, mole_run, tmp_path):
    """Generations belong to the origin that wrote them: a copy synced to a folder and served
    over HTTP opens (its chunks' crc32c still checked) and reads the same rows."""
    export_lut(mole_run, dtype="float16", out="s3://stores/copied/lut")
    src, dst = _kv("s3://stores/copied/lut"), _kv(str(tmp_path / "copy"))
    for key in src.list().result():
        dst.write(key, src.read(key).result().value).result()
    ids = np.arange(0, 512, 5)
    want = LutStore.open("s3://stores/copied/lut").read_packed(ids)
    assert np.array_equal(LutStore.open(tmp_path / "copy").read_packed(ids), want)
    with http_server(tmp_path) as (url, _):
        assert np.array_equal(LutStore.open(f"{url}/copy").read_packed(ids), want)


def test_a_packed_store_costs_one_request_per_token(s3, mole_run):
    """A decode step's new token: one request from a packed store, one per array (layer and
    scale) from a layered one; a batch's tokens at most one each (neighbours share one)."""
    for layout in ("packed", "layers"):
        export_lut(mole_run, dtype="int8", out=f"s3://stores/{layout}/lut", layout=layout)
        store = LutStore.open(f"s3://stores/{layout}/lut")
        store.read_packed(np.array([0]))  # the shard indexes, once (never revalidated)
        per_token = 1 if layout == "packed" else len(store.arrays)
        for t in (100, 37, 401, 250):  # tokens not read before
            before = io_counters()
            store.read_packed(np.array([t]))
            assert io_counters()[0] - before[0] == per_token, (layout, t)
        before = io_counters()
        store.read_packed(np.arange(1, 33) * 11)
        assert 1 <= io_counters()[0] - before[0] <= 32 * per_token
    assert len(store.arrays) == 2 * len(store.layers)  # int8 layers: values and scales


def test_a_second_export_replaces_the_first_and_removes_its_prefix(s3, mole_run):
    first = export_lut(mole_run, dtype="float16", out="s3://stores/again/lut")
    second = export_lut(mole_run, dtype="float16", out="s3://stores/again/lut")
    assert first["prefix"] != second["prefix"]
    keys = [k.decode() for k in _kv("s3://stores/again/lut").list().result()]
    assert {k.split("/")[0] for k in keys} == {"manifest.json", second["prefix"]}
    assert LutStore.open("s3://stores/again/lut").manifest["prefix"] == second["prefix"]
    # two at once: the one that publishes second is refused (a conditional PUT)
    late = Staging.begin(location("s3://stores/again/lut"))
    third = export_lut(mole_run, dtype="float16", out="s3://stores/again/lut")
    with pytest.raises(StoreError, match="another export published s3://stores/again/lut"):
        remote.put(late.final, "manifest.json", b"{}", late.found)
    assert LutStore.open("s3://stores/again/lut").manifest["prefix"] == third["prefix"]


def test_data_prefixes_sort_in_the_order_exports_began(s3):
    """Stale-prefix removal keeps what sorts after its own prefix: two exports begun within one
    second must still sort in order (seconds and a random suffix did not: CI kept a stale one)."""
    prefixes = [Staging.begin(location("s3://stores/order/lut")).prefix for _ in range(20)]
    assert prefixes == sorted(prefixes) and len(set(prefixes)) == 20


def test_damaged_remote_and_local_stores_fail_in_one_line(s3, mole_run, tmp_path):
    m = export_lut(mole_run, dtype="float16", out="s3://stores/damaged/lut")
    kv = _kv(f"s3://stores/damaged/lut/{m['prefix']}")
    shard = max(k for k in m["generations"] if "/c/" in k)
    data = kv.read(shard).result().value
    kv.write(shard, data[:-1] + bytes([data[-1] ^ 1])).result()  # replaced: generation changes
    with pytest.raises(StoreError, match="was replaced after the export"):
        LutStore.open("s3://stores/damaged/lut")
    kv.delete_range(ts.KvStore.KeyRange(shard, shard + "\0")).result()
    with pytest.raises(StoreError, match=f"{shard} is missing"):
        LutStore.open("s3://stores/damaged/lut")
    # deleted after the store was opened: the read fails, never zeros
    m = export_lut(mole_run, dtype="float16", out="s3://stores/late/lut")
    store = LutStore.open("s3://stores/late/lut")
    shard = max(k for k in m["generations"] if "/c/" in k)
    _kv(f"s3://stores/late/lut/{m['prefix']}").delete_range(
        ts.KvStore.KeyRange(shard, shard + "\0")
    ).result()
    with pytest.raises(StoreError, match="the store is corrupt or incomplete"):
        store.read_all()
    # a folder: a deleted chunk file fails the read that needs it
    export_lut(mole_run, dtype="float16", out=str(tmp_path / "lut"))
    shard_file = max((tmp_path / "lut").rglob("c/*/*/*"), key=lambda p: p.stat().st_size)
    shard_file.unlink()
    engine = build_engine(mole_run, "offload", store=str(tmp_path / "lut"), verify="none")
    with pytest.raises(StoreError, match="the store is corrupt or incomplete"):
        engine.rows.store.read_all()


def test_unreachable_endpoint_and_missing_credentials_fail_fast(s3, mole_run, monkeypatch):
    export_lut(mole_run, dtype="float16", out="s3://stores/creds/lut")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("HOME", "/nonexistent")
    with pytest.raises(StoreError, match="PERMISSION_DENIED.*check the credentials"):
        LutStore.open("s3://stores/creds/lut")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="cannot reach the LUT store at s3://stores/creds/lut"):
        LutStore.open("s3://stores/creds/lut")
    assert time.monotonic() - t0 < 30  # retries capped (MOLE_JAX_STORE_RETRIES)


def test_urls_are_checked_and_secrets_never_printed():
    assert redact("GET https://user:pw@h.example/x?X-Amz-Signature=abc failed") == (
        "GET https://***@h.example/x?*** failed"
    )
    assert redact("s3://AKIA:ab/cd@bucket/x") == "s3://***@bucket/x"  # a '/' in the secret
    with pytest.raises(UserError, match="credentials do not go in a store URL") as e:
        location("s3://key:se/cret@bucket/x")
    assert "se/cret" not in str(e.value) and "key" not in str(e.value)
    with pytest.raises(UserError, match="a store URL is"):
        location("ftp://host/x")
    with pytest.raises(UserError, match="read-only"):
        Staging.begin(location("http://127.0.0.1:1/x"))
    assert location("file:///tmp/a/b") == location("/tmp/a/b")
    assert location("s3://b/p/q/").kvstore("r")["path"] == "p/q/r/"
    assert (
        location("s3://Bucket").kvstore()["path"] == ""
        and location("s3://Bucket").bucket == "Bucket"
    )


def test_moe_experts_offloaded_from_s3_equal_in_memory(s3, tmp_path_factory, corpus_dir,
                                                       cache_dir):  # fmt: skip
    w = trained_workdir(tmp_path_factory, moe.get_config("size=tiny,experts=4,topk=2"),
                        corpus_dir, cache_dir)  # fmt: skip
    export_experts(w, dtype="float32", out="s3://stores/moe/experts")
    ref = evaluate(w, "experts", n_batches=1)
    got = evaluate(w, "moe_offload", n_batches=1, store="s3://stores/moe/experts", capacity=2)
    assert abs(got["loss"] - ref["loss"]) <= 1e-5 and got["io_requests"] > 0


def _launch(*args, env):
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), *args]
    return run_bounded(cmd, timeout=300, env=env)


def test_cli_export_to_s3_then_eval_offloaded_from_it(s3, mole_run):
    env = dict(os.environ)
    proc = _launch("export", f"--workdir={mole_run}", "--to=s3://stores/cli/lut", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "to s3://stores/cli/lut (float16, packed)" in proc.stdout
    local = _launch("eval", f"--workdir={mole_run}", "--offload", "--max_tokens=4096", env=env)
    remote = _launch("eval", f"--workdir={mole_run}", "--offload", "--max_tokens=4096",
                     "--store=s3://stores/cli/lut", env=env)  # fmt: skip
    assert local.returncode == remote.returncode == 0, remote.stderr
    loss = [p.stdout.split("loss ")[1].split(",")[0] for p in (local, remote)]
    assert loss[0] == loss[1] and "requests and" in remote.stdout
    gone = _launch("eval", f"--workdir={mole_run}", "--offload", "--store=s3://stores/none/lut",
                   env=env)  # fmt: skip
    assert gone.returncode == 2 and gone.stderr.strip().count("\n") == 0, gone.stderr
    assert gone.stderr.startswith("error: no LUT store at s3://stores/none/lut")


def test_a_sweep_exports_each_runs_lut_under_its_store_url(s3, corpus_dir, cache_dir, tmp_path):
    from test_sweep import _settings, write_study

    one = """[dict(name="mole", config="configs/mole.py:size=tiny,experts=2", set=s,
              evals=[dict(name="fp16", export="float16")])]"""
    study = write_study(tmp_path / "study.py", _settings(corpus_dir, cache_dir), one)
    env = dict(os.environ)
    proc = _launch("sweep", f"--config={study}", f"--workdir={tmp_path / 'w'}",
                   "--store=s3://stores/sweep", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    row = json.loads((tmp_path / "w" / "sweep.json").read_text())["rows"][0]
    assert abs(row["evals"]["fp16"]["loss"] - row["val_loss"]) < 1e-4
    assert row["evals"]["fp16"]["io_requests"] > 0
    assert LutStore.open("s3://stores/sweep/mole/lut_float16").manifest["layout"] == "packed"
    assert not (tmp_path / "w" / "mole" / "lut_float16").exists()
