r"""Zero-shot accuracy on the offline task pack, in memory and offloaded (the papers' metric).

Question: do dense, MoE-10E and MoLE-4E (equal activated parameters; MoE-10E and MoLE-4E equal
training parameters) order the same way on accuracy as on validation loss, and does MoLE keep its
accuracy when its LUT is read from storage in float16 and in nf4 — beyond the seed spread?
Tasks: `mole_offline` (`mole_jax/tasks/`: next-line choice among 4, last word, rolling
perplexity, from the corpus' held-out plays). Each kind is trained with `seeds` seeds.
Expected (MoLE paper, Tables 2 and 8): MoLE >= MoE > dense; offloaded fp16 equal to in memory,
nf4 within noise. At CPU scale (300 steps) accuracies sit near chance, so differences inside the
seed spread are reported as such.

    python launch.py sweep --config=experiments/zero_shot.py:size=small,steps=300,seeds=2 \
        --workdir=runs/zero_shot
"""

import numpy as np

from experiments._study import knobs, run

KINDS = (("dense", "dense", {}), ("moe-10e", "moe", dict(experts=10, topk=2)),
         ("mole-4e", "mole", dict(experts=4)))  # fmt: skip
TASKS = ("mole_next_line", "mole_last_word")


def get_config(arg=None):
    return knobs(arg, size="small", steps=300, seeds=2, limit=0)


def get_sweep(c):
    offloaded = [dict(name="fp16 offloaded", export="float16"),
                 dict(name="nf4 offloaded", export="nf4")]  # fmt: skip
    runs = []
    for seed in range(c.seeds):
        for name, kind, args in KINDS:
            r = run(f"{name}-s{seed}", kind, c, evals=offloaded if kind == "mole" else (), **args)
            r["set"]["seed"] = seed
            r["tasks"] = ["mole_offline"]
            if c.limit:
                r["task_limit"] = c.limit
            runs.append(r)
    return runs


def _acc(row, engine="model"):
    return {t: row["tasks"][engine]["tasks"][t]["acc"] for t in TASKS}


def _spread(values) -> str:
    v = np.asarray(values)
    return f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if len(v) > 1 else "")


def report(rows):
    by_kind = {name: [r for r in rows if r["name"].startswith(name + "-s")] for name, _, _ in KINDS}
    lines = []
    for task in TASKS:
        cells = [f"{k} {_spread([_acc(r)[task] for r in rs])}" for k, rs in by_kind.items()]
        lines.append(f"- {task} accuracy (mean ± std over seeds): " + ", ".join(cells))
    loss = ", ".join(f"{k} {_spread([r['val_loss'] for r in rs])}" for k, rs in by_kind.items())
    lines.append(f"- validation loss: {loss}")
    for engine in ("fp16 offloaded", "nf4 offloaded"):
        for task in TASKS:
            d = [_acc(r, engine)[task] - _acc(r)[task] for r in by_kind["mole-4e"]]
            lines.append(f"- MoLE-4E {engine} minus in memory, {task}: "
                         + ", ".join(f"{x:+.4f}" for x in d))  # fmt: skip
    mole = by_kind["mole-4e"]
    per_k = {e: _spread([r["tasks"][e]["seconds"] * 1000 / r["tasks"][e]["requests"]
                         for r in mole]) for e in ("model", "fp16 offloaded")}  # fmt: skip
    lines.append(f"- seconds per 1,000 requests, MoLE-4E: in memory {per_k['model']}, "
                 f"fp16 offloaded {per_k['fp16 offloaded']}")  # fmt: skip
    return "\n".join(lines)
