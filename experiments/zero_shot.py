r"""Zero-shot accuracy on the offline task pack, in memory and offloaded (the papers' metric).

Question: do dense, MoE-10E and MoLE-4E (equal activated parameters; MoE-10E and MoLE-4E equal
training parameters) order the same way on accuracy as on validation loss, and does MoLE keep its
accuracy when its LUT is read from storage in float16 and in nf4 — beyond the seed spread?
Tasks: `mole_offline` (`mole_jax/eval/tasks/`: next-line choice among 4, last word, rolling
perplexity, from the corpus' held-out plays). Each kind is trained with `seeds` seeds.
Expected (MoLE paper, Tables 2 and 8): MoLE >= MoE > dense; offloaded fp16 equal to in memory,
nf4 within noise. At CPU scale (300 steps) accuracies sit near chance.

Claims (`CLAIMS`): MoLE-4E above MoE-10E above dense, on validation loss and on each task's
accuracy, Holm-corrected together. Every seed scores the same items, but the shipped runs did not
save per-item results: an accuracy is tested over seeds with each run's item-level standard
error added (`mole_jax/sweeps/claims.py`: the conservative, unpaired bound). The paper's MoLE >= MoE
is tested as MoLE above MoE: *contradicted* would refute it, *not resolved* does not confirm it.
The offloaded engines' equality with the in-memory one is reported per seed, not tested.
Declared after the shipped runs (experiments/results/studies/zero_shot): post hoc for them.

    python launch.py sweep --config=experiments/zero_shot.py:size=small,steps=300,seeds=3 \
        --workdir=runs/zero_shot
"""

from experiments._study import by_group, knobs, run
from mole_jax.sweeps.claims import Claim

KINDS = (("dense", "dense", {}), ("moe-10e", "moe", dict(experts=10, topk=2)),
         ("mole-4e", "mole", dict(experts=4)))  # fmt: skip
TASKS = ("mole_next_line", "mole_last_word")
OFFLOADED = ("fp16 offloaded", "nf4 offloaded")
PAIRS = (("mole-4e", "moe-10e"), ("moe-10e", "dense"), ("mole-4e", "dense"))  # better, worse

CLAIMS = [
    Claim(a, b, metric, source="MoLE Table 2: MoLE >= MoE > dense (average accuracy)")
    for a, b in PAIRS
    for metric in ("val_loss", *(f"task:model/{t}/acc" for t in TASKS))
]


def get_config(arg=None):
    return knobs(arg, size="small", steps=300, seeds=3, limit=0, tasks="mole_offline")


def get_sweep(c):
    offloaded = [dict(name=OFFLOADED[0], export="float16"), dict(name=OFFLOADED[1], export="nf4")]
    runs = []
    for name, kind, args in KINDS:
        r = run(name, kind, c, evals=offloaded if kind == "mole" else (), **args)
        r["seeds"] = c.seeds  # run() gave it the tasks knob: the offline pack by default
        if c.limit:
            r["task_limit"] = c.limit
        runs.append(r)
    return runs


def _acc(task, engine="model"):
    return lambda r: r["tasks"][engine]["tasks"][task]["acc"]


def report(rows):
    """Descriptive: what offloading the LUT changes in accuracy per seed, and request speed."""
    lines = []
    mole = by_group(rows)["mole-4e"]
    for engine in OFFLOADED:
        for task in TASKS:
            d = [_acc(task, engine)(r) - _acc(task)(r) for r in mole]
            lines.append(f"- MoLE-4E {engine} minus in memory, {task} accuracy, per seed: "
                         + ", ".join(f"{x:+.4f}" for x in d))  # fmt: skip
    per_k = {e: [1000 * r["tasks"][e]["seconds"] / r["tasks"][e]["requests"] for r in mole]
             for e in ("model", OFFLOADED[0])}  # fmt: skip
    lines.append("- seconds per 1,000 requests, MoLE-4E, per seed: in memory "
                 + ", ".join(f"{x:.1f}" for x in per_k["model"]) + "; fp16 offloaded "
                 + ", ".join(f"{x:.1f}" for x in per_k[OFFLOADED[0]]))  # fmt: skip
    return "\n".join(lines)
