"""Checkpoint digests: the same on every sharding, computed without gathering a leaf, sensitive to
one changed element; checkpoints written with the SHA-256 digests that came before still verify."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mole_jax.stores import digest
from mole_jax.train import checkpoint


def _tree():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {
        "w": jax.random.normal(k1, (64, 48)),
        "e": jax.random.normal(k2, (8, 16, 4)).astype(jnp.bfloat16),
        "n": jnp.arange(10, dtype=jnp.int32),
        "b": jnp.array(True),
    }


def _shardings(mesh, spec_w, spec_e):
    rep = NamedSharding(mesh, P())
    return {"w": NamedSharding(mesh, spec_w), "e": NamedSharding(mesh, spec_e), "n": rep, "b": rep}


def test_the_digest_is_the_same_on_every_sharding():
    tree = _tree()
    one = digest.digests(jax.device_get(tree))
    devices = np.array(jax.devices())
    for shape, spec_w, spec_e in [
        ((8,), P("a"), P(None, "a")),
        ((2, 4), P("a", "b"), P("b", None, "a")),
        ((4, 2), P(None, ("a", "b")), P("a")),
    ]:
        mesh = Mesh(devices.reshape(shape), ("a", "b")[: len(shape)])
        assert digest.digests(jax.device_put(tree, _shardings(mesh, spec_w, spec_e))) == one


def test_one_changed_element_changes_its_leaf_and_the_whole():
    tree = _tree()
    total, leaves = digest.digests(tree)
    for name, index in [("w", (63, 47)), ("e", (0, 0, 0)), ("n", (3,))]:
        changed = dict(tree)
        x = tree[name]
        changed[name] = x.at[index].set(x[index] + jnp.asarray(1, x.dtype))
        t2, l2 = digest.digests(changed)
        assert t2 != total and l2[f"['{name}']"] != leaves[f"['{name}']"]
        assert all(l2[k] == v for k, v in leaves.items() if k != f"['{name}']")
    # two swapped elements: same bytes in another order
    swapped = dict(tree, w=tree["w"].at[0, :2].set(tree["w"][0, 1::-1]))
    assert digest.digests(swapped)[0] != total
    # same bytes, another shape
    assert digest.digests(dict(tree, w=tree["w"].reshape(48, 64)))[0] != total


def test_a_sharded_leaf_is_digested_where_it_lives():
    """The compiled digest of a sharded leaf reduces each shard in one fused pass (no
    shard-sized temporary) and all-reduces the lanes; it never gathers the leaf."""
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    x = jax.device_put(jnp.ones((1024, 256)), NamedSharding(mesh, P(("a", "b"))))
    compiled = digest._leaf_sharded_lanes.lower(x, mesh, (("a", "b"),)).compile()
    hlo = compiled.as_text()
    assert "all-reduce" in hlo and "all-gather" not in hlo
    assert compiled.memory_analysis().temp_size_in_bytes < 2**16  # a shard is 128 KiB
    # the same lanes as the four plain sums, and as the fused form on one device
    y = np.asarray(x)
    np.testing.assert_array_equal(digest._one_leaf(x), digest._leaf_lanes(x))
    np.testing.assert_array_equal(digest._leaf_lanes_fused(y), digest._leaf_lanes(x))
    big = jnp.ones((1024, 1024))
    assert (
        digest._leaf_lanes_fused.lower(big).compile().memory_analysis().temp_size_in_bytes < 2**16
    )


def test_a_sha256_checkpoint_of_the_earlier_format_still_verifies(tmp_path):
    state = {"step": jnp.asarray(7), "params": _tree(), "opt": jnp.zeros(3)}
    train = {k: v for k, v in state.items() if k != "params"}
    total, leaves = checkpoint._sha256_digests(state["params"])
    old_meta = {  # what Checkpointer.save wrote before digest.py
        "step": 7,
        "params_sha256": total,
        "leaf_sha256": leaves,
        "train_sha256": checkpoint._sha256_digests(train)[0],
        "run_sha256": "",
    }
    ckpt = checkpoint.Checkpointer(tmp_path, use_async=False)
    ckpt.mgr.save(
        7,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave(old_meta),
        ),
    )
    got, meta = ckpt.restore(state)
    assert checkpoint.params_id(meta) == total
    np.testing.assert_array_equal(got["params"]["w"], state["params"]["w"])
    (params, _), _ = ckpt.restore_params({"w": state["params"]["w"]})
    np.testing.assert_array_equal(params["w"], state["params"]["w"])
    ckpt.close()


@pytest.mark.parametrize("what", ["params", "train"])
def test_a_new_checkpoint_whose_meta_disagrees_is_refused(tmp_path, what):
    state = {"step": jnp.asarray(3), "params": _tree(), "opt": jnp.zeros(3)}
    ckpt = checkpoint.Checkpointer(tmp_path, use_async=False)
    ckpt.save(state)
    assert ckpt.meta()["digest"] == digest.ALGORITHM
    wrong = dict(state)
    if what == "params":
        wrong["params"] = dict(state["params"], w=state["params"]["w"] * 2)
    else:
        wrong["opt"] = jnp.ones(3)
    # the digests of `state` with the bytes of `wrong`: write wrong, then put state's meta back
    good_meta = ckpt.meta()
    ckpt.close()
    other = checkpoint.Checkpointer(tmp_path / "other", use_async=False)
    other.save(wrong)
    other.close()
    meta_file = tmp_path / "other" / "checkpoints" / "3" / "meta" / "metadata"
    meta_file.write_text(json.dumps(good_meta))
    other = checkpoint.Checkpointer(tmp_path / "other", use_async=False)
    with pytest.raises(Exception, match="does not match the digest"):
        other._restore_state(3, state)
    other.close()


def test_an_unknown_digest_kind_is_named_and_the_step_moved_aside(tmp_path, capsys):
    """Damage or a newer mole_jax: the step is unusable here; it is moved aside (renamed, not
    deleted) with a line naming the kind, and the previous step is used."""
    state = {"step": jnp.asarray(3), "params": _tree(), "opt": jnp.zeros(3)}
    ckpt = checkpoint.Checkpointer(tmp_path, use_async=False)
    ckpt.save(state)
    ckpt.save(dict(state, step=jnp.asarray(4)))
    meta = dict(ckpt.meta(4), digest="future/9")
    ckpt.close()
    (tmp_path / "checkpoints" / "4" / "meta" / "metadata").write_text(json.dumps(meta))
    ckpt = checkpoint.Checkpointer(tmp_path, use_async=False)
    _, got = ckpt.restore(state)
    assert got["step"] == 3 and ckpt.steps() == [3]
    assert (tmp_path / "checkpoints" / "4.corrupt").is_dir()
    assert "'future/9', unknown to this mole_jax" in capsys.readouterr().out
    ckpt.close()


def test_the_first_sha256_checkpoints_restore_a_subset_unchecked(tmp_path):
    """Before per-leaf digests a checkpoint had only the whole-tree SHA-256: a form that reads
    some leaves (lut, offload) cannot check them, and must not call the checkpoint corrupt."""
    state = {"step": jnp.asarray(7), "params": _tree(), "opt": jnp.zeros(3)}
    train = {k: v for k, v in state.items() if k != "params"}
    old_meta = {"step": 7, "params_sha256": checkpoint._sha256_digests(state["params"])[0]}
    ckpt = checkpoint.Checkpointer(tmp_path, use_async=False)
    ckpt.mgr.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(state["params"]),
                                             train=ocp.args.StandardSave(train),
                                             meta=ocp.args.JsonSave(old_meta)))  # fmt: skip
    (params, _), _ = ckpt.restore_params({"w": state["params"]["w"]})
    np.testing.assert_array_equal(params["w"], state["params"]["w"])
    assert ckpt.steps() == [7]
    ckpt.close()
