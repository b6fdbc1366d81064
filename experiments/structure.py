r"""From MoE to MoLE, one change at a time (the MoLE paper's Table 7, at CPU scale).

Question: which step of the path MoE-10E top-2 -> all 10 experts active -> 1 shared + 4 routed
experts of twice the width (MoLE's structure, experts reading the hidden state) -> experts reading
the token embedding -> the LUT costs or gains what?
Expected (MoLE paper, Table 7): activating all experts and the shared + routed structure help;
switching the routed experts' input to the embedding costs a little; the LUT is exact.

    python launch.py sweep --config=experiments/structure.py:size=tiny,steps=600,seeds=3 \
        --workdir=runs/structure
"""

from experiments._study import claim, knobs, run

STEPS = ("moe-10e-top2", "moe-10e-all", "shared-4e-hidden", "mole-4e-embedding")


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
    lines = [
        f"- {STEPS[1]} below {STEPS[0]} (claim: full activation helps, +1.5 acc): "
        f"{claim(rows, STEPS[1], STEPS[0])}",
        f"- {STEPS[2]} below {STEPS[1]} (claim: about equal, -0.3 acc; 'inside the spread' "
        f"agrees): {claim(rows, STEPS[2], STEPS[1])}",
        f"- {STEPS[2]} below {STEPS[3]} (claim: the embedding input costs a little, -0.7 acc): "
        f"{claim(rows, STEPS[2], STEPS[3])}",
    ]
    last = [r for r in rows if r.get("group") == STEPS[3]]
    worst = max(abs(r["evals"]["LUT fp32 in memory"]["loss"] - r["val_loss"]) for r in last)
    return "\n".join(lines + [f"- LUT minus trained model, largest over seeds: {worst:.2e}"])
