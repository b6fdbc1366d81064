"""Train-step throughput and model FLOP utilisation.

Question: how fast is one optimiser step of a config on this machine, how close to the machine's
own matmul peak does it run, and what does each FFN kind cost against dense?

    python experiments/bench_train.py --config=configs/dense.py:size=small [--json=out.json]
    python experiments/bench_train.py --compare=small [--set=train.batch_size=512,...]
        [--only=dense,mole-4e,"mole-4e per_position"]

`--compare` runs dense, MoE-10E (top-2, experts F/2), PEER (paper's h=8, k=16, middle block),
MoLE-4E with the unique-token tables and MoLE-4E computed per position, all at `size`; MoE and
MoLE activate as many FFN parameters per token as dense (PEER fewer: its row shows how many).

Method: real batches (the config's corpus), the jitted train step with donation, `--warmup`
untimed steps after compilation, then `--steps` steps each blocked on its result; the median is
reported. MFU = flops_per_token * tokens_per_s / peak, where flops_per_token is 3x the forward
FLOPs of the activated inference-form model (accounting.py: 6N + attention) and the peak is a
jitted square matmul in the config's compute dtype measured here, printed beside it. The XLA cost
analysis of the compiled step (FLOPs the program actually executes) is reported as well.
"""

from __future__ import annotations

import json
import time

import _paths  # noqa: F401
import jax
import jax.numpy as jnp
import numpy as np
from _tables.bench import train_table
from absl import app, flags, logging
from ml_collections import config_flags

from mole_jax.config import apply_overrides
from mole_jax.data import pipeline
from mole_jax.model.layers import compute_dtype
from mole_jax.train import accounting, trainer

config_flags.DEFINE_config_file("config", None, "Config to benchmark: path.py:arg.")
flags.DEFINE_integer("steps", 10, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_string("json", None, "Write the result here.")
flags.DEFINE_string("compare", None, "Size at which to compare all kinds against dense.")
flags.DEFINE_list("only", [], "With --compare: just these rows, e.g. 'dense,mole-4e'.")
flags.DEFINE_string("set", "", "Overrides for --compare: 'train.batch_size=64,data.seq_len=64'.")
FLAGS = flags.FLAGS


def matmul_peak(dtype, n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of the best of `reps` jitted n x n x n matmuls in `dtype` on this machine."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = min(_timed(lambda: f(a).block_until_ready()) for _ in range(reps))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(cfg, steps: int = 10, warmup: int = 2, peak: float | None = None) -> dict:
    """Times `steps` train steps of `cfg` after compilation and `warmup` steps."""
    tr = trainer.setup(cfg)
    td = pipeline.prepare(cfg)
    t = cfg.train
    batches = [
        pipeline.train_batch(td.train, cfg.seed, s, t.batch_size, cfg.data.seq_len)
        for s in range(steps + warmup)
    ]
    state, step, put = tr.init_state(), tr.step_fn, tr.put_batch
    t0 = time.perf_counter()
    state, _ = step(state, *put(batches[0]))  # compile (and for MoLE, the first table-size bucket)
    jax.block_until_ready(state)
    compile_s = time.perf_counter() - t0
    cost = step.lower(state, *put(batches[0])).cost_analysis()
    cost = (cost[0] if isinstance(cost, list) else cost) or {}
    times = []
    for i, b in enumerate(batches):
        args = put(b)  # host work (batch slicing, dedup) is part of the step time
        t0 = time.perf_counter()
        state, m = step(state, *args)
        jax.block_until_ready((state, m))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    summary = accounting.summarize(cfg)
    tokens = t.batch_size * cfg.data.seq_len
    step_s = float(np.median(times))
    flops_per_token = 3 * summary["flops_per_token"]
    peak = peak or matmul_peak(compute_dtype(cfg.model))
    return {
        "kind": cfg.model.ffn.kind,
        "tokens_per_step": tokens,
        "step_time_s": step_s,
        "step_time_p90_s": float(np.percentile(times, 90)),
        "tokens_per_s": tokens / step_s,
        "flops_per_token": flops_per_token,
        "xla_flops_per_token": float(cost.get("flops", 0.0)) / tokens,
        "peak_flops": peak,
        "mfu": flops_per_token * tokens / step_s / peak,
        "compile_s": compile_s,
        "params_total": summary["params_total"],
        "params_active_per_token": summary["params_active_per_token"],
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
        "final_loss": float(m["loss"]),
    }


def compare_configs(size: str) -> dict:
    from configs import dense, moe, mole, peer

    per_position = mole.get_config(f"size={size},experts=4")
    per_position.model.ffn.mole.impl = "per_position"
    return {
        "dense": dense.get_config(f"size={size}"),
        "moe-10e": moe.get_config(f"size={size},experts=10,topk=2"),
        "peer": peer.get_config(f"size={size}"),
        "mole-4e": mole.get_config(f"size={size},experts=4"),
        "mole-4e per_position": per_position,
    }


def main(_):
    logging.set_verbosity(logging.WARNING)
    if FLAGS.compare:
        peak = matmul_peak(jnp.float32)
        rows = []
        for name, cfg in compare_configs(FLAGS.compare).items():
            if FLAGS.only and name not in FLAGS.only:
                continue
            res = bench(apply_overrides(cfg, FLAGS.set), FLAGS.steps, FLAGS.warmup, peak)
            rows.append(dict(res, name=name))
            print(f"  {name}: {res['step_time_s']:.3f} s/step", flush=True)
        print(train_table(rows, rows[0]))
        print(
            f"peak (measured float32 matmul): {peak / 1e9:.1f} GFLOP/s; size={FLAGS.compare}, "
            f"overrides: {FLAGS.set or 'none'}"
        )
        result = {"size": FLAGS.compare, "overrides": FLAGS.set, "rows": rows}
        if FLAGS.json:
            with open(FLAGS.json, "w") as f:
                json.dump(result, f, indent=2)
        return
    cfg = FLAGS.config
    res = bench(cfg, FLAGS.steps, FLAGS.warmup)
    res["name"] = f"{cfg.model.ffn.kind}"
    print(train_table([res]))
    print(
        f"peak (measured {compute_dtype(cfg.model).name} matmul): {res['peak_flops'] / 1e9:.1f} "
        f"GFLOP/s on {res['devices']} {res['backend']} device(s); compile {res['compile_s']:.1f}s"
    )  # noqa: E501
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    app.run(main)
