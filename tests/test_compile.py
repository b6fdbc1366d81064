"""`launch.py compile` for real targets from this CPU host: tiny dense / MoE / MoLE train steps
compiled for a TPU v5e:2x2 slice and for 4 H100s, through the compilers of the [tpu] and
[gpu-aot] extras (installed by `make test` into .venv-aot, a venv of their own)."""

import json
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from mole_jax.errors import ConfigError
from mole_jax.parallel import targets
from mole_jax.train import hlo

AOT_PYTHON = os.environ.get("MOLE_JAX_AOT_PYTHON", os.path.join(ROOT, ".venv-aot", "bin", "python"))
# dense is compiled for a 64-device TPU target below; these two for a TPU and a GPU target
CASES = [("moe", "configs/moe.py:size=tiny"), ("mole", "configs/mole.py:size=tiny,experts=4")]


def compile_json(tmp_path, config: str, topology: str, *extra: str) -> dict:
    if not os.path.exists(AOT_PYTHON):
        pytest.skip(f"no {AOT_PYTHON}: `make aot` installs the TPU/GPU compilers")
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}  # compile sets its own
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "jax_cache")
    cmd = [AOT_PYTHON, os.path.join(ROOT, "launch.py"), "compile", f"--config={config}",
           f"--topology={topology}", f"--json={out}", *extra]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{topology}:" in proc.stdout and "roofline step" in proc.stdout, proc.stdout
    # a deviceless executable cannot be read back from JAX's persistent cache (no client), so
    # compile leaves the cache off rather than write entries in vain (and warn on reading them)
    assert not list((tmp_path / "jax_cache").glob("*-cache")), "compile wrote JAX's cache"
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "topology,platform,kind_name", [("v5e:2x2", "tpu", "TPU v5"), ("h100:1x1x4", "gpu", "H100")]
)
@pytest.mark.parametrize("kind,config", CASES)
def test_compile_for_a_target_reports_its_program(tmp_path, kind, config, topology, platform,
                                                  kind_name):  # fmt: skip
    r = compile_json(tmp_path, config, topology, "--config.data.seq_len=128")
    assert r["platform"] == platform and kind_name in r["device_kind"] and r["devices"] == 4
    assert r["mesh"] == {"data": 4, "fsdp": 1, "expert": 1, "tensor": 1}
    assert r["compiled"] and r["fits"]
    assert set(r["host_malloc"]) == {"arena_max", "mmap_threshold", "trim_threshold"}  # all set
    m = r["memory_per_device"]
    assert 0 < m["argument_size"] and 0 < m["peak_memory"] < r["device_memory"]
    # the MoE's grouped matmul is blocked on every target (ragged_dot compiles dense there)
    assert r["ragged_dot_ops"] == 0
    # 128 positions: the attention is a flash kernel there (splash / Triton), its FLOPs added
    assert r["pallas_calls"] > 0 and r["cost_per_device"]["flash_kernel_flops"] > 0
    assert not r["roofline"]["approximate"]  # every loop's trip count read, FLOPs counted
    assert r["collectives"]["all-reduce"]["count"] >= 1  # data parallel: gradients all-reduced
    assert r["cost_per_device"]["flops"] > 0.5 * r["model_flops_per_device"]
    rf = r["roofline"]
    parts = [v for k, v in rf.items() if k in ("compute_s", "memory_s", "collectives_s")]
    assert rf["step_s"] == max(parts) and rf["serial_s"] == pytest.approx(sum(parts), rel=1e-3)
    assert 0 < rf["mfu_serial"] <= rf["mfu"] <= 1


@pytest.mark.slow
def test_a_mesh_larger_than_this_host_is_valid_for_its_target(tmp_path):
    """The mesh is checked against the target's 64 devices, not this host's: fsdp=64 holds."""
    r = compile_json(tmp_path, "configs/dense.py:size=tiny", "v5p:4x4x4",
                     "--config.mesh.data=1", "--config.mesh.fsdp=64",
                     "--config.train.batch_size=64")  # fmt: skip
    assert r["devices"] == 64 and r["hosts"] == 16 and r["mesh"]["fsdp"] == 64
    # the state is sharded 64 ways: each device holds far less than a replica's params + 2 moments
    assert r["memory_per_device"]["argument_size"] < 12 * r["params_total"] / 16


def test_bad_topologies_are_one_line():
    for bad in ("v5p-128", "h100:8", "tpu:4x4", "v5p:4x4x4x4"):
        with pytest.raises(ConfigError, match="--topology="):
            targets.parse(bad)
    assert targets.parse("v5p:4x4x4").platform == "tpu"
    assert targets.parse("h100:1x8x8").peak.memory == 84_942_979_072
    with pytest.raises(ConfigError, match="PxHxD"):
        targets.parse("h100:8x8")


def _loop(unroll):
    """Five matmuls in a loop, each followed by an all-reduce over 4 host devices."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("d",))

    def body(_, y):
        return lax.psum(jnp.tanh(y @ y), "d")

    def f(x):
        return lax.fori_loop(0, 5, body, x, unroll=unroll)

    shard = jax.shard_map(f, mesh=mesh, in_specs=PartitionSpec(), out_specs=PartitionSpec())
    return jax.jit(shard).lower(jnp.ones((64, 64))).compile()


def test_loop_bodies_are_multiplied_out_as_the_unrolled_program_counts_them():
    looped, unrolled = _loop(1), _loop(True)
    prog = hlo.parse(looped.as_text())
    assert [lp.trips for lp in hlo.all_loops(prog)] == [5]
    cost = hlo.cost(looped, prog)
    # XLA counts the body once; multiplied out, the matmuls are the unrolled program's
    assert cost["counted_once"]["flops"] < 0.25 * cost["flops"]
    reference = hlo.cost(unrolled, hlo.parse(unrolled.as_text()))["counted_once"]["flops"]
    assert 5 * 2 * 64**3 <= cost["flops"] and cost["flops"] == pytest.approx(reference, abs=20)
    assert hlo.collectives(prog)["all-reduce"] == {"count": 5, "bytes": 5 * 64 * 64 * 4}
    # a TPU program prints no trip count: it is read from the condition, i < 5 from i = 0
    bare = re.sub(r'"known_trip_count":\{"n":"\d+"\}', "", looped.as_text())
    assert [lp.trips for lp in hlo.all_loops(hlo.parse(bare))] == [5]


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["v5e:2x2", "h100:1x1x4"])
def test_a_scanned_step_counts_what_the_unrolled_step_computes(tmp_path, topology):
    """Six scanned MoLE blocks, multiplied out, against the same six blocks unrolled: the
    compiled FLOPs agree to the fusions' differences (measured 0.6 % TPU, 1.7 % GPU)."""
    config, six = "configs/mole.py:size=tiny,experts=4", "--config.model.n_layers=6"
    scanned = compile_json(tmp_path, config, topology, six, "--config.model.scan_layers=true")
    unrolled = compile_json(tmp_path, config, topology, six, "--config.model.scan_layers=false")
    assert scanned["scanned_loops"] == [6, 6] and unrolled["scanned_loops"] == []
    flops = scanned["cost_per_device"]["flops"]
    assert flops == pytest.approx(unrolled["cost_per_device"]["flops"], rel=0.02)
    assert scanned["cost_per_device"]["counted_once"]["flops"] < 0.9 * flops
    assert not scanned["roofline"]["approximate"]


def test_the_plan_is_calibrated_by_the_committed_compiles():
    """memory.CALIBRATION is what `compile_plan.py --replan` fitted to the compiled peaks of the
    21 paper configurations per platform, and it narrows the plan's error against them."""
    from mole_jax.train import memory

    with open(os.path.join(ROOT, "experiments", "results", "plan_calibration.json")) as f:
        fitted = json.load(f)
    assert set(fitted) == set(memory.CALIBRATION)
    for platform, fit in fitted.items():
        assert memory.CALIBRATION[platform] == fit["activation_factors"]
        assert sum(fit["configurations"].values()) == 21
        lo, hi = fit["error_calibrated"]
        assert hi - lo < fit["error_one_factor"][1] - fit["error_one_factor"][0]
