r"""Auxiliary losses on MoLE's router (the MoLE paper's Table 4, at CPU scale).

Question: MoLE routes with a softmax over all experts, all active; does adding MoE's load-balance
loss, and then its router z-loss, help or hurt MoLE-16E?
Expected (MoLE paper, Table 4): the losses hurt a little (LM only 42.0 average accuracy, + LB
41.6, + LB + z 41.5 at 160M), so MoLE trains without them.

    python launch.py sweep --config=experiments/aux_losses.py:size=tiny,steps=600,seeds=3 \
        --workdir=runs/aux_losses
"""

from experiments._study import by_group, knobs, mean, run
from mole_jax.sweeps.claims import Claim

SETTINGS = (("lm-only", 0.0, 0.0), ("lb", 0.01, 0.0), ("lb-z", 0.01, 0.001))

# The paper's direction: each aux loss makes MoLE worse (accuracy there, validation loss here).
# Declared after the shipped runs (experiments/results/studies/aux_losses): post hoc for them.
CLAIMS = [
    Claim("lm-only", "lb", source="MoLE Table 4: LM only 42.0 vs + LB 41.6 average accuracy"),
    Claim("lm-only", "lb-z", source="MoLE Table 4: LM only 42.0 vs + LB + z 41.5"),
]


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, experts=16, seeds=3)


def get_sweep(c):
    runs = []
    for name, lb, z in SETTINGS:
        r = run(name, "mole", c, experts=c.experts)
        r["set"].update({"model.ffn.mole.lb_coef": lb, "model.ffn.mole.z_coef": z})
        runs.append(dict(r, seeds=c.seeds))
    return runs


def report(rows):
    """The groups' mean validation losses (descriptive; the claims are tested above)."""
    g = by_group(rows)
    return "- mean validation loss: " + ", ".join(
        f"{n} {mean(g[n]):.4f} ({len(g[n])} seeds)" for n, _, _ in SETTINGS if n in g
    )
