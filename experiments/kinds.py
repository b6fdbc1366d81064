r"""Dense vs MoE vs MoLE at equal parameters (the MoLE paper's main comparison, at CPU scale).

Question: with the same activated parameters per token and the same training tokens, where do
MoE-10E and MoLE-4E (equal parameters in training) land against dense, and, with `large=true`,
MoE-34E against MoLE-16E?
Expected (MoLE paper, at small scale): dense worse than both; MoLE close to MoE at equal
training parameters. The MoLE-4E run is also evaluated with its experts exported as a float16 LUT
and read from storage (the offloaded number must equal the in-memory one).

    python launch.py sweep --config=experiments/kinds.py:size=small,steps=300 --workdir=runs/kinds
"""

from experiments._study import knobs, run, val
from mole_jax.sweeps.claims import Claim

# The paper's direction: dense worse than both at equal activated parameters. Its "MoLE close to
# MoE" is no direction, so it is not declared (MoLE - MoE is reported). One seed per model: the
# verdicts say so (no spread); zero_shot.py tests the same claims over 3 seeds. Declared after the
# shipped runs (experiments/results/studies/kinds).
CLAIMS = [
    Claim("moe-10e", "dense", source="MoLE Tables 2-3: MoE-10E above dense"),
    Claim("mole-4e", "dense", source="MoLE Tables 2-3: MoLE-4E above dense"),
]


def get_config(arg=None):
    return knobs(arg, size="small", steps=300, large=False)


def get_sweep(c):
    fp16 = dict(name="LUT fp16 offloaded", export="float16")
    runs = [
        run("dense", "dense", c),
        run("moe-10e", "moe", c, experts=10, topk=2),
        run("mole-4e", "mole", c, evals=[fp16], experts=4),
    ]
    if c.large:
        runs += [
            run("moe-34e", "moe", c, experts=34, topk=2),
            run("mole-16e", "mole", c, evals=[fp16], experts=16),
        ]
    return runs


def report(rows):
    """Descriptive, one seed: the losses, MoLE minus MoE, offloaded minus in memory."""
    v = val(rows)
    lines = [
        f"- validation loss (one seed): dense {v['dense']:.4f}, MoE-10E {v['moe-10e']:.4f}, "
        f"MoLE-4E {v['mole-4e']:.4f}",
        f"- MoLE-4E minus MoE-10E: {v['mole-4e'] - v['moe-10e']:+.4f}",
    ]
    if "mole-16e" in v:
        lines.append(f"- MoLE-16E minus MoE-34E: {v['mole-16e'] - v['moe-34e']:+.4f}")
    off = next(r for r in rows if r["name"] == "mole-4e")["evals"]["LUT fp16 offloaded"]["loss"]
    lines.append(f"- MoLE-4E offloaded fp16 LUT minus in memory: {off - v['mole-4e']:+.2e}")
    return "\n".join(lines)
