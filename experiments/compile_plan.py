"""Fit by the compiler's numbers: every paper configuration compiled for 64 H100s and for a TPU
v5p:4x4x4 slice at the paper batch (1024 x 2048 tokens), each with the fewest micro-batches
whose compiled step fits the device, beside the closed-form plan.

Question: which paper configurations fit at their shipped defaults, with how many micro-batches,
and how far is `summary`'s closed-form plan from the compiled program?
Method: `launch.py compile` (mole_jax/train/aot.py) in its own process per attempt, in .venv-aot
(`make aot`: the [tpu] and [gpu-aot] compilers), micro-batches 1, 2, 4, ... until the compiled
peak fits the device (a TPU compile past its memory is refused by the compiler and counted as
not fitting). Rows already in the JSON are kept (`--redo` compiles them again), so a long plan
can be filled in over several sittings.

    python experiments/compile_plan.py [--only=1b-moe-34e,160m-mole-16e] [--targets=h100:1x8x8]
        [--json=experiments/results/compile_plan.json]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import _paths
from absl import app, flags

flags.DEFINE_list("only", [], "Rows to compile (default: all), e.g. 1b-moe-34e.")
flags.DEFINE_list("targets", ["h100:1x8x8", "v5p:4x4x4"], "Topologies.")
flags.DEFINE_string("json", "experiments/results/compile_plan.json", "Results (kept and extended).")
flags.DEFINE_bool("redo", False, "Compile rows that are already in the JSON again.")
flags.DEFINE_integer("max_micro", 64, "Give up past this many micro-batches.")
flags.DEFINE_bool("replan", False, "Only recompute every row's closed-form plan (no compiling).")
flags.DEFINE_string("calibration", "experiments/results/plan_calibration.json",
                    "Where --replan writes the plan's fit to the compiled peaks.")  # fmt: skip
FLAGS = flags.FLAGS

KINDS = {  # name -> config file argument (the papers' configurations)
    "dense": "configs/dense.py:size={size}",
    "moe-10e": "configs/moe.py:size={size},experts=10",
    "moe-34e": "configs/moe.py:size={size},experts=34",
    "mole-4e": "configs/mole.py:size={size},experts=4",
    "mole-16e": "configs/mole.py:size={size},experts=16",
    "peer": "configs/peer.py:size={size}",
    "pregated": "configs/pregated.py:size={size}",
}
SIZES = ("160m", "410m", "1b")
AOT_PYTHON = os.path.join(_paths.ROOT, ".venv-aot", "bin", "python")


def rows() -> list[tuple[str, str]]:
    names = [(f"{s}-{k}", KINDS[k].format(size=s)) for s in SIZES for k in KINDS]
    return [(n, c) for n, c in names if not FLAGS.only or n in FLAGS.only]


def compile_once(config: str, topology: str, micro: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "c.json")
        cmd = [AOT_PYTHON, os.path.join(_paths.ROOT, "launch.py"), "compile",
               f"--config={config}", f"--topology={topology}", f"--json={out}",
               f"--config.train.microbatches={micro}"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=_paths.ROOT, env=env)
        if proc.returncode != 0:
            return {"compiled": False, "fits": False, "error": proc.stderr.strip()[-300:]}
        with open(out) as f:
            return json.load(f)


def fewest_micro(config: str, topology: str) -> dict:
    """The first of 1, 2, 4, ... micro-batches whose compiled step fits; every attempt kept."""
    attempts, micro = [], 1
    while micro <= FLAGS.max_micro:
        r = compile_once(config, topology, micro)
        attempts.append({"microbatches": micro, **{k: r.get(k) for k in ("compiled", "fits")}})
        print(f"  {topology} micro={micro}: {'fits' if r.get('fits') else 'does not fit'}",
              flush=True)  # fmt: skip
        if r.get("fits") or "error" in r and "RESOURCE_EXHAUSTED" not in r["error"]:
            return {**r, "attempts": attempts}
        micro *= 2
    return {**r, "attempts": attempts}


def load_config(row: dict):
    """The row's config as compiled: its file argument and micro-batches, on the 64-device
    mesh the paper sizes default to."""
    import importlib

    module, _, arg = row["config"].removeprefix("configs/").partition(".py:")
    cfg = importlib.import_module(f"configs.{module}").get_config(arg)
    cfg.train.microbatches = row["microbatches"]
    return cfg


def _factor(parts: list[tuple]) -> float:
    """The activation factor k minimising sum (log((peak - state) / activations) - log k)^2
    over `parts` (row, kind, state bytes, activation bytes)."""
    import math

    logs = [math.log(max(r["memory_per_device"]["peak_memory"] - state, 1) / act)
            for r, _, state, act in parts]  # fmt: skip
    return math.exp(sum(logs) / len(logs))


def _span(parts: list[tuple], factors: dict) -> list[float]:
    """The plan's relative error range against the compiled peaks, each row's activations
    scaled by its kind's factor (or "all")."""
    errors = [(state + factors.get(kind, factors["all"]) * act) / r["memory_per_device"]
              ["peak_memory"] - 1 for r, kind, state, act in parts]  # fmt: skip
    return [round(min(errors), 3), round(max(errors), 3)]


def replan(rows: list[dict]) -> dict:
    """Per platform and per FFN kind, the activation factor that best fits the compiled peaks
    (`_factor`), "all" for every kind together (used for kinds not compiled); the plan's error
    range before and after; every row's `planned_bytes_per_device` recomputed with its kind's
    factor."""
    from mole_jax.train import memory

    fit = {}
    for platform in sorted({r["platform"] for r in rows}):
        parts = []
        for r in rows:
            if r["platform"] == platform and r.get("compiled"):
                cfg = load_config(r)
                sizes = memory.mesh_sizes(cfg.mesh, r["devices"])
                p = memory.plan(cfg, sizes, platform, calibrated=False)
                parts.append((r, cfg.model.ffn.kind, p["total"] - p["activations"],
                              p["activations"]))  # fmt: skip
        of = {k: [x for x in parts if x[1] == k] for k in sorted({x[1] for x in parts})}
        # rounded as memory.CALIBRATION holds them, so the rows' plans are summary's
        factors = {k: round(_factor(x), 4) for k, x in (of | {"all": parts}).items()}
        for r, kind, state, act in parts:
            r["planned_bytes_per_device"] = int(state + factors[kind] * act)
        fit[platform] = {
            "activation_factors": factors,
            "configurations": {k: len(x) for k, x in of.items()},
            "error_closed_form": _span(parts, {"all": 1.0}),
            "error_one_factor": _span(parts, {"all": factors["all"]}),
            "error_calibrated": _span(parts, factors),
            "error_calibrated_by_kind": {k: _span(x, factors) for k, x in of.items()},
        }
    return fit


def main(_):
    if FLAGS.replan:
        with open(FLAGS.json) as f:
            compiled = json.load(f)["rows"]
        fit = replan(compiled)
        print(json.dumps(fit, indent=1))
        with open(FLAGS.json, "w") as f:
            json.dump({"rows": compiled}, f, indent=1)
        with open(FLAGS.calibration, "w") as f:
            json.dump(fit, f, indent=1)
        return
    if not os.path.exists(AOT_PYTHON):
        sys.exit(f"error: no {AOT_PYTHON}: run `make aot` first (the TPU/GPU compilers)")
    done = {}
    if os.path.exists(FLAGS.json):
        with open(FLAGS.json) as f:
            done = {(r["name"], r["topology"]): r for r in json.load(f)["rows"]}
    for name, config in rows():
        for topology in FLAGS.targets:
            if (name, topology) in done and not FLAGS.redo:
                continue
            print(f"{name} on {topology} ({config})", flush=True)
            r = fewest_micro(config, topology)
            done[(name, topology)] = {"name": name, "config": config, **r, "topology": topology}
            with open(FLAGS.json, "w") as f:  # after every row: a stopped plan keeps its rows
                json.dump({"rows": list(done.values())}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
