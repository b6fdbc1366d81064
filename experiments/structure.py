r"""From MoE to MoLE, one change at a time (the MoLE paper's Table 7, at CPU scale).

Question: which step of the path MoE-10E top-2 -> all 10 experts active -> 1 shared + 4 routed
experts of twice the width (MoLE's structure, experts reading the hidden state) -> experts reading
the token embedding -> the LUT costs or gains what?
Expected (MoLE paper, Table 7): activating all experts and the shared + routed structure help;
switching the routed experts' input to the embedding costs a little; the LUT is exact.

    python launch.py sweep --config=experiments/structure.py:size=tiny,steps=600,seeds=3 \
        --workdir=runs/structure
"""

from experiments._study import by_group, knobs, mean, run
from mole_jax.sweeps.claims import Claim

STEPS = ("moe-10e-top2", "moe-10e-all", "shared-4e-hidden", "mole-4e-embedding")

# Each step in the paper's direction (Table 7, 160M, average accuracy). The second is the paper's
# "about equal" (-0.3): a directional test cannot show equality; its MDE says what the runs
# could have seen. Declared after the shipped runs (experiments/results/studies/structure).
CLAIMS = [
    Claim(STEPS[1], STEPS[0], source="MoLE Table 7: all 10 active +1.5 over top-2"),
    Claim(STEPS[1], STEPS[2], source="MoLE Table 7: shared + routed -0.3 ('about equal')"),
    Claim(STEPS[2], STEPS[3], source="MoLE Table 7: embedding input -0.7 against hidden"),
]


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, seeds=3)


def get_sweep(c):
    lut = dict(name="LUT fp32 in memory", export="float32", mode="lut_memory")
    runs = [
        run(STEPS[0], "moe", c, experts=10, topk=2),
        run(STEPS[1], "moe", c, experts=10, topk=10),
        run(STEPS[2], "mole", c, experts=4, input="hidden"),
        run(STEPS[3], "mole", c, evals=[lut], experts=4, input="embedding"),
    ]
    return [dict(r, seeds=c.seeds) for r in runs]


def report(rows):
    """Descriptive: each step's mean loss, and how far the LUT is from the trained model."""
    g = by_group(rows)
    means = ", ".join(f"{n} {mean(g[n]):.4f}" for n in STEPS if n in g)
    last = g.get(STEPS[3], [])
    worst = max(abs(r["evals"]["LUT fp32 in memory"]["loss"] - r["val_loss"]) for r in last)
    return "\n".join([f"- mean validation loss: {means}",
                      f"- LUT minus trained model, largest over seeds: {worst:.2e}"])  # fmt: skip
