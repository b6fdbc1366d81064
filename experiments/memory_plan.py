"""The memory plan of the paper configurations: bytes per device of a training step at the paper
batch (1024 x 2048 tokens), on FSDP meshes of 8 and 64 devices, and the gradient-accumulation
steps each needs to fit a device of --budget_gb.

Question: which of the papers' runs fit on 8 or 64 80 GB accelerators, and with how many
micro-batches? Expected: everything at 64 devices; at 8, the 1b models only with many
micro-batches, or not at all (optimiser state alone is 12 bytes per parameter).

    python experiments/memory_plan.py [--devices=8,64] [--budget_gb=80]

Method: `memory.plan` (summary's bytes_per_device) for each configuration, micro-batches from
`memory.fit`: the fewest that fit. Parameters, gradients and AdamW moments are float32 and split
by the rules table; activations are the planner's closed-form estimate for bfloat16 compute with
remat='full', a 512-position loss chunk and per-micro-batch token tables (the defaults from
160m up) on a GPU (a MoE's grouped matmul blocked), checked against XLA's memory
analysis at tiny and small (CPU) in tests/test_memory.py, and scaled by the GPU factor of the
model's kind fitted to the compiled paper configurations (`memory.CALIBRATION`).
"""

from __future__ import annotations

import json
from pathlib import Path

import _paths  # noqa: F401
from _tables.guide import memory_table
from absl import app, flags

from configs import dense, moe, mole
from mole_jax.train import memory

flags.DEFINE_list("devices", ["8", "64"], "Mesh sizes (all on the fsdp axis).")
flags.DEFINE_float("budget_gb", 80.0, "Bytes per device to fit, in GiB.")
flags.DEFINE_string("json", "experiments/results/memory_plan.json", "Write the rows here.")
FLAGS = flags.FLAGS

MODELS = [("dense", dense, ""), ("MoE-34E", moe, ",experts=34"), ("MoLE-16E", mole, ",experts=16")]


def rows(devices: int, budget: float) -> list[dict]:
    out = []
    for size in ("160m", "410m", "1b"):
        for name, module, extra in MODELS:
            cfg = module.get_config(f"size={size}{extra}")
            cfg.mesh.update(dict(data=1, fsdp=devices))
            sizes = memory.mesh_sizes(cfg.mesh, devices)
            plan, micro = memory.fit(cfg, sizes, budget)
            out.append(dict(size=size, model=name, devices=devices, microbatches=micro, **plan))
    return out


def main(_):
    budget = FLAGS.budget_gb * 2**30
    all_rows = [r for d in map(int, FLAGS.devices) for r in rows(d, budget)]
    print(memory_table(all_rows))
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps(all_rows, indent=2))


if __name__ == "__main__":
    app.run(main)
