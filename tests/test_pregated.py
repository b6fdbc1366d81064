"""Pre-gated MoE (Read-ME): the router is causal and runs once; every block uses the same route
per token; a block equals a naive per-expert loop over those routes; accounting is exact."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import pregated
from mole_jax.model.backbone import build_model
from mole_jax.model.config import model_config
from mole_jax.model.ffn.base import Ctx
from mole_jax.model.layers import ACTIVATIONS
from mole_jax.train import accounting

GELU = ACTIVATIONS["gelu"]


def tiny(arg="size=tiny,experts=4,permanent=1", **ffn):
    cfg = pregated.get_config(arg)
    cfg.model.vocab_size = cfg.data.vocab_size = 256
    cfg.model.ffn.pregated.update(ffn)
    return cfg


def routed_model(cfg, seed=0):
    model = build_model(model_config(cfg), seed=seed)
    # a router far from uniform, so that tokens take different paths
    model.router.out[...] = jax.random.normal(jax.random.key(3), model.router.out.shape)
    return model


IDS = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)), jnp.int32)


def routes_of(model, ids):
    return model.router(ids, jnp.arange(ids.shape[1]))[0]


def test_router_is_causal_and_every_block_uses_its_one_route():
    model = routed_model(tiny())
    r = routes_of(model, IDS)
    for t in (0, 5, 11):  # a change at position t never changes a route before t
        changed = IDS.at[:, t].set((IDS[:, t] + 1) % 256)
        r2 = routes_of(model, changed)
        before = slice(0, t)
        np.testing.assert_array_equal(r.logits_TxE.reshape(2, 12, -1)[:, before],
                                      r2.logits_TxE.reshape(2, 12, -1)[:, before])  # fmt: skip
        assert not np.array_equal(r.logits_TxE.reshape(2, 12, -1)[:, t],
                                  r2.logits_TxE.reshape(2, 12, -1)[:, t])  # fmt: skip
    per_layer = model(IDS).aux["per_layer"]
    load = np.bincount(np.asarray(r.experts_TxK).ravel(), minlength=4) / r.experts_TxK.size
    assert 1 < np.count_nonzero(load) and len(per_layer) == 2
    for aux in per_layer.values():  # the same routes in every block
        np.testing.assert_allclose(aux["expert_load"], load, rtol=0, atol=1e-7)
    assert ("lb_loss" in per_layer[0]) and ("lb_loss" not in per_layer[1])  # counted once


def test_block_equals_naive_loop_over_the_routes():
    model = routed_model(tiny(topk=2))
    r = routes_of(model, IDS)
    layer = model.blocks[1].ffn
    x = jax.random.normal(jax.random.key(1), (2, 12, 64))
    y, _ = layer(x, Ctx(IDS, None, routes=r))
    x_TxD = x.reshape(-1, 64)
    ref = layer.permanent(x_TxD)
    for e in range(4):
        gate = jnp.sum(jnp.where(r.experts_TxK == e, r.weights_TxK, 0.0), axis=-1)
        ref = ref + gate[:, None] * (GELU(x_TxD @ layer.up[e]) @ layer.down[e])
    np.testing.assert_allclose(y.reshape(-1, 64), ref, rtol=1e-5, atol=1e-6)


def test_accounting_is_exact_and_active_params_equal_dense():
    from configs import dense

    for arg in ("size=tiny,experts=4", "size=tiny,experts=8,permanent=1", "size=160m,experts=8"):
        s = accounting.summarize(pregated.get_config(arg))
        assert s["params_total"] == s["params_total_formula"], arg
    with_router = accounting.summarize(pregated.get_config("size=tiny,experts=4"))
    d = accounting.summarize(dense.get_config("size=tiny"))
    r, n = model_config(tiny()).ffn.router_d, 4  # width, paths
    n_router = sum(x.size for x in jax.tree.leaves(
        nnx.state(build_model(model_config(tiny())).router, nnx.Param)))  # fmt: skip
    assert n_router == 256 * r + 6 * r * r + r * n + 3 * r  # V*R, attention + MLP, out, norms
    # top-1 over d_ff-wide experts: the backbone's active parameters are dense's, plus the router
    extra = with_router["params_active_per_token"] - d["params_active_per_token"]
    assert extra == 8192 * r + 6 * r * r + r * n + 3 * r


@pytest.fixture(scope="module")
def pregated_run(tmp_path_factory, corpus_dir, cache_dir):
    from conftest import trained_workdir

    from mole_jax.infer.export import export_experts

    cfg = pregated.get_config("size=tiny,experts=4,permanent=1")
    w = trained_workdir(tmp_path_factory, cfg, corpus_dir, cache_dir, steps=4)
    export_experts(w, dtype="float32")
    return w


@pytest.mark.slow
def test_expert_store_of_a_trained_pregated_model(pregated_run):
    from mole_jax.stores.experts import ExpertStore
    from mole_jax.train.checkpoint import restore_model
    from mole_jax.workdir import Workdir

    w = pregated_run
    manifest = json.load(open(f"{w}/experts/manifest.json"))
    assert manifest["layers"] == [0, 1] and manifest["experts"] == 4
    params = restore_model(w, model_config(Workdir(w).config)).params
    store = ExpertStore.open(f"{w}/experts")
    for layer, e in ((0, 3), (1, 0)):
        up, down = store.start_read(layer, e).result()
        np.testing.assert_array_equal(up, params["blocks"][layer]["ffn"]["up"][e])
        np.testing.assert_array_equal(down, params["blocks"][layer]["ffn"]["down"][e])


@pytest.mark.slow
@pytest.mark.parametrize("capacity", [0, 2])
def test_lookahead_engine_equals_in_memory(pregated_run, capacity):
    from mole_jax.infer.engine import build_engine
    from mole_jax.infer.generate import generate

    ref = build_engine(pregated_run, "experts")
    eng = build_engine(pregated_run, "lookahead", capacity=capacity)
    ids = np.random.default_rng(3).integers(0, 512, (2, 12))
    np.testing.assert_allclose(eng.forward(ids)[0], ref.forward(ids)[0], rtol=1e-5, atol=1e-5)
    st = eng.stats()
    assert st["expert_recall"] == 1.0 and st["lookups"] > 0 and st["bytes_read"] > 0
    got = generate(eng, ids[:, :5], 6)["tokens"]
    np.testing.assert_array_equal(got, generate(ref, ids[:, :5], 6)["tokens"])
    eng.reset_stats()
    eng.forward(ids[:1, :4])
    eng.forward(ids[:1, :4])  # the same tokens again: everything cached when it fits
    st = eng.stats()
    assert (st["hits"] > 0) == (capacity > 0)


@pytest.mark.slow
def test_forward_batch_equals_each_call_alone(pregated_run):
    """Prefills and decodes of different requests at different KV positions, run as one batch
    (each block's experts once over all their tokens), give each call's own logits and cache."""
    from mole_jax.infer.engine import build_engine

    ref = build_engine(pregated_run, "experts")
    eng = build_engine(pregated_run, "lookahead", capacity=4)
    rng = np.random.default_rng(11)
    ids = [rng.integers(0, 512, (1, n)) for n in (5, 3, 7)]
    caches = [ref.init_cache(1, 12) for _ in ids]
    _, caches[1] = ref.forward(ids[1], caches[1])  # request 1 decodes its 4th token next
    calls = [(ids[0], caches[0]), (ids[1][:, :1], caches[1]), (ids[2], caches[2])]
    got = eng.forward_batch(calls)
    for (x, c), (logits, cache) in zip(calls, got, strict=True):
        want, want_cache = ref.forward(x, c)
        np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
        assert int(cache["index"]) == int(want_cache["index"])
        for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(want_cache), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_queue_server_generates_as_in_memory_with_the_policys_cache(pregated_run):
    from mole_jax.errors import UserError
    from mole_jax.infer.engine import build_engine
    from mole_jax.infer.generate import generate
    from mole_jax.infer.offload import serving
    from mole_jax.infer.offload.policies import simulate
    from mole_jax.infer.offload.server import serve

    ref = build_engine(pregated_run, "experts")
    eng = build_engine(pregated_run, "lookahead", capacity=2)
    model = nnx.merge(ref.graphdef, ref.params, ref.rest)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 512, int(rng.integers(2, 6))) for _ in range(6)]
    news = [int(n) for n in rng.integers(1, 5, 6)]
    want = [
        generate(ref, p[None], n)["tokens"][0].tolist() for p, n in zip(prompts, news, strict=True)
    ]
    every_item = sorted((i, s) for i, n in enumerate(news) for s in range(n))
    # the queue as offline scheduling sees it: every token's path from the in-memory router
    requests = []
    for i, (p, n) in enumerate(zip(prompts, news, strict=True)):
        ids = jnp.asarray(np.concatenate([p, want[i]])[None])
        paths = model.router(ids, jnp.arange(ids.shape[1]))[0].experts_TxK[:, 0]
        requests.append(serving.Request(i, tuple(np.asarray(paths).tolist()), len(p), n))
    for policy in serving.POLICIES:
        for eviction in ("lru", "belady"):
            eng.reset_stats()
            out = serve(eng, prompts, news, budget=8, policy=policy, eviction=eviction)
            assert [out["tokens"][i] for i in range(6)] == want
            assert out["batches"] == serving.schedule(requests, 8, policy)
            assert sorted((it.rid, it.step) for b in out["batches"] for it in b) == every_item
            assert max(sum(it.tokens for it in b) for b in out["batches"]) <= 8
            assert eng.stats()["experts_read"] == 2 * sum(out["loads"])  # 2 layers, aligned
            assert all(len(c) <= 2 for c in eng.cache.values())
            if eviction == "lru":
                assert out["loads"] == simulate(out["trace"], 2, "lru")["step_loads"]
            # the cost-model replay's online cache loads what the executed server loads
            replayed = serving.replay(requests, 8, policy, lambda *_: 1.0, 2, eviction)
            assert replayed["loads"] == out["loads"]
        # every route known up front (one new token each): online Belady = the offline optimum
        eng.reset_stats()
        out = serve(eng, prompts, [1] * 6, budget=8, policy=policy, eviction="belady")
        best = simulate(out["trace"], 2, "belady")
        assert out["loads"] == best["step_loads"] and best["loads"] > len(out["trace"][0])
    assert len(set().union(*out["trace"])) == 4  # every path is used: the cache has work
    # a stream: nothing is served before it arrives, and the tokens are the same; every shape
    # its batches form was compiled before (`compile_batches`: a timed server compiles nothing)
    eng.compile_batches(8)
    compiled = eng._apply._cache_size()
    assert compiled == len(eng.moe_layers) * 4 * 3  # tokens 1, 2, 4, 8 x experts 1, 2, 4
    at = [0.0, 0.0, 0.3, 0.3, 0.6, 0.6]
    out = serve(eng, prompts, news, budget=8, policy="expert_aware", arrivals=at)
    assert [out["tokens"][i] for i in range(6)] == want
    starts = zip(out["batches"], out["start"], strict=True)
    assert all(t >= at[it.rid] for b, t in starts for it in b)
    assert out["start"][-1] >= 0.6 and (out["latency_s"] > 0).all()
    assert eng._apply._cache_size() == compiled
    with pytest.raises(UserError, match="prompt of 1..8"):
        serve(eng, [prompts[0][:0]], [2], budget=8, policy="decode_first")
