"""Seconds per 1,000 lm-eval requests: in memory against the LUT read from storage.

Question: what does scoring the offline task pack cost when MoLE's routed experts are a LUT read
from storage, against the trained model in memory?

    python experiments/bench_zero_shot.py --workdir=runs/zero_shot/mole-4e-s0 [--rounds=2]

Method: `zero_shot.run_tasks` on `mole_offline` (2,040 requests), alternating in memory /
fp16 LUT offloaded (`--lut`, exported if missing) / nf4, `--rounds` rounds, each a fresh engine
(its compilation included, as a user's run has it); the table gives each round's seconds per
1,000 requests and the bytes read per token. This VM's speed drifts over minutes: compare
within a round.
"""

from __future__ import annotations

import json

import _paths  # noqa: F401
from _stores import fresh
from absl import app, flags

from mole_jax.eval.zero_shot import run_tasks
from mole_jax.infer.export import export_lut
from mole_jax.stores.lut import LutStore

flags.DEFINE_string("workdir", "runs/zero_shot/mole-4e-s0", "A trained MoLE workdir.")
flags.DEFINE_list("luts", ["float16", "nf4"], "LUT dtypes read from storage.")
flags.DEFINE_integer("rounds", 2, "Alternating rounds.")
flags.DEFINE_string("json", "experiments/results/bench_zero_shot.json", "Write the rows here.")
FLAGS = flags.FLAGS


def main(_):
    w = FLAGS.workdir
    for dt in FLAGS.luts:
        fresh(LutStore, w, f"lut_{dt}", lambda d=dt: export_lut(w, dtype=d, out=f"lut_{d}"))
    engines = [("in memory", "experts", None)] + [
        (f"{dt} LUT offloaded", "offload", f"lut_{dt}") for dt in FLAGS.luts
    ]
    rows = []
    for r in range(FLAGS.rounds):
        for name, mode, lut in engines:
            out = run_tasks(w, ["mole_offline"], mode, lut=lut)
            rows.append(dict(
                round=r, engine=name, requests=out["requests"], seconds=out["seconds"],
                seconds_per_1000=1000 * out["seconds"] / out["requests"],
                bytes_read_per_token=out.get("bytes_read_per_token", 0),
                next_line_acc=out["tasks"]["mole_next_line"]["acc"],
            ))  # fmt: skip
            print(rows[-1], flush=True)
    print(f"\n{'round':>5} {'engine':22} {'s / 1,000 requests':>19} {'bytes read / token':>19}")
    for x in rows:
        print(f"{x['round']:5d} {x['engine']:22} {x['seconds_per_1000']:19.1f} "
              f"{x['bytes_read_per_token']:19,.0f}")  # fmt: skip
    with open(FLAGS.json, "w") as f:
        json.dump(dict(workdir=w, rows=rows), f, indent=2)


if __name__ == "__main__":
    app.run(main)
