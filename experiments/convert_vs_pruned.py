"""Read-ME's conversion against pruning (the shape of Read-ME Table 5, at CPU scale).

Question: a trained dense model is converted into a pre-gated MoE (one expert per domain, the
router distilled, experts tuned) or pruned to the same active FFN width by the same channel
criterion and tuned on the same batches. Which has the lower loss on each domain's held-out text?
Expected (Read-ME paper, Table 5): the converted model, on every domain (Read-ME 4.7B vs a pruned
4.7B dense model: lower perplexity on all 7 domains).

    python experiments/convert_vs_pruned.py --dense=runs/num_experts/dense-s0 --out=runs/convert

Method: the dense workdir (any trained tiny/small dense run) is converted twice with
`launch.py convert`: `configs/pregated.py:convert=1,permanent=1` over the domains shakespeare,
linux-doc, pydoc (3 experts of d_ff/4 beside a permanent expert of d_ff/4: half the dense FFN
active per token), and the same config with `experts=1` over the joined domain
`shakespeare+linux-doc+pydoc` (the pruned baseline: the d_ff/2 channels most important over all
domains). The weights of both get the same updates on the same batches: the baseline runs the
same expert-tuning rounds (it has no router to tune), so the only difference is the routing. Loss
per domain on each corpus's validation split (`--eval_batches` batches), the dense model's beside
them. `--expert_lr` / `--router_lr` override the config's Read-ME learning rates (5e-5 / 5e-4,
set for a 7B model whose pretraining peaked at 3e-4: about a sixth of it for the experts); a tiny
model pretrained at 3e-3 gets the same ratio with `--expert_lr=5e-4`. `--seed` sets both
conversions' seed (their calibration windows and tuning batches; the same for the two).

Claims (`CLAIMS`, tested by `make docs` over the JSONs of one setting's seeds, `claim_rows`):
converted below pruned on each domain, paired by seed, Holm over the domains. The replicates are
not independent: every seed converts the same dense source and is evaluated on the same
validation windows, so the seed-to-seed spread leaves out the source's own variation (a study
that needs independent replicates trains one dense source per seed). Declared after the shipped
runs (experiments/results/convert_vs_pruned_small*.json): post hoc for them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import _paths  # noqa: F401
from _tables.bench import convert_table
from absl import app, flags

from mole_jax.eval.validation import evaluate
from mole_jax.sweeps.claims import Claim


def _define_flags() -> None:
    """The script's flags, defined when it runs (the docs' renderers import this file for its
    CLAIMS beside other scripts' flags, e.g. faults.py's --seed)."""
    flags.DEFINE_string("dense", "runs/num_experts/dense-s0", "A trained dense workdir.")
    flags.DEFINE_string("out", "runs/convert", "Where the two converted workdirs go.")
    flags.DEFINE_string("size", "tiny", "The dense run's size (configs' size argument).")
    flags.DEFINE_integer("rounds", 2, "Alternating rounds.")
    flags.DEFINE_integer("router_steps", 50, "Router tuning steps per round.")
    flags.DEFINE_integer("expert_steps", 100, "Expert tuning steps per round.")
    flags.DEFINE_float(
        "expert_lr", 0.0, "Expert tuning LR (0: configs/pregated.py's, Read-ME's 5e-5)."
    )
    flags.DEFINE_float(
        "router_lr", 0.0, "Router tuning LR (0: configs/pregated.py's, Read-ME's 5e-4)."
    )
    flags.DEFINE_integer("eval_batches", 20, "Validation batches per domain.")
    flags.DEFINE_integer("seed", 0, "The conversions' seed: calibration windows, tuning batches.")
    flags.DEFINE_string("json", "experiments/results/convert_vs_pruned.json", "Rows go here.")


FLAGS = flags.FLAGS

DOMAINS = ("shakespeare", "linux-doc", "pydoc")
CONVERTED, PRUNED = "converted: 3 experts + permanent", "pruned: same active width"
LIMITATION = "replicates share one dense source and evaluation windows: not independent"
CLAIMS = [Claim("converted", "pruned", d, source=f"Read-ME Table 5; {LIMITATION}") for d in DOMAINS]


def claim_rows(results: list[dict]) -> list[dict]:
    """The rows CLAIMS are tested on, from the JSONs this script wrote (one per seed): a row per
    model and seed, its loss on each domain under the domain's name."""
    rows = []
    for res in results:
        seed = res["flags"].get("seed", 0)  # the first runs predate --seed
        for group, model in (("converted", CONVERTED), ("pruned", PRUNED)):
            got = next(r for r in res["rows"] if r["model"] == model)
            rows.append(dict({d: got[d] for d in DOMAINS}, name=f"{group}-s{seed}", group=group,
                             set={"seed": seed}))  # fmt: skip
    return rows


def convert(name: str, arg: str, domains: str, router: int, expert: int) -> str:
    w = os.path.join(FLAGS.out, name)
    if os.path.exists(os.path.join(w, "convert.json")):
        seed = json.load(open(os.path.join(w, "config.json")))["seed"]
        if seed != FLAGS.seed:
            raise SystemExit(f"error: {w} was converted with seed {seed}, not --seed={FLAGS.seed}")
    else:
        cmd = [sys.executable, "launch.py", "convert", f"--from={FLAGS.dense}", f"--workdir={w}",
               f"--config=configs/pregated.py:{arg}", f"--config.convert.domains={domains}",
               f"--config.convert.rounds={FLAGS.rounds}",
               f"--config.convert.router_steps={router}",
               f"--config.convert.expert_steps={expert}",
               f"--config.seed={FLAGS.seed}"]  # fmt: skip
        cmd += [f"--config.convert.{k}={v}" for k, v in _lrs().items()]
        subprocess.run(cmd, check=True)
    return w


def _lrs() -> dict:
    return {k: v for k, v in (("expert_lr", FLAGS.expert_lr), ("router_lr", FLAGS.router_lr)) if v}


def main(_):
    cfg = json.load(open(os.path.join(FLAGS.dense, "config.json")))
    size = FLAGS.size
    r, e = FLAGS.router_steps, FLAGS.expert_steps
    runs = {
        "dense (source)": FLAGS.dense,
        CONVERTED: convert(
            "converted", f"size={size},convert=1,permanent=1", ",".join(DOMAINS), r, e
        ),
        PRUNED: convert(
            "pruned", f"size={size},convert=1,permanent=1,experts=1", "+".join(DOMAINS), 0, e
        ),
    }
    rows = []
    for name, w in runs.items():
        row = dict(model=name, workdir=w)
        for d in DOMAINS:
            corpus = None if d == cfg["data"]["corpus"] else d
            out = evaluate(w, corpus=corpus, n_batches=FLAGS.eval_batches, write=False)
            row[d] = out["loss"]
        rows.append(row)
    print("\n" + convert_table(rows))
    conv, pruned = rows[1], rows[2]
    wins = [d for d in DOMAINS if conv[d] < pruned[d]]
    print(f"\nconverted below pruned on {len(wins)} of {len(DOMAINS)} domains ({', '.join(wins)})")
    Path(FLAGS.json).parent.mkdir(parents=True, exist_ok=True)
    flag = dict(dense=FLAGS.dense, size=size, seed=FLAGS.seed, rounds=FLAGS.rounds,
                router_steps=r, expert_steps=e, eval_batches=FLAGS.eval_batches,
                **_lrs())  # fmt: skip
    Path(FLAGS.json).write_text(json.dumps(dict(flags=flag, rows=rows), indent=1))
    print(f"wrote {FLAGS.json}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
