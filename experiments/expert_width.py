r"""Routed expert width (the MoLE paper's Table 5, at CPU scale).

Question: the routed experts' hidden width D_r grows training FLOPs and parameters, but not the
LUT (a token's row is E x D whatever D_r is): what does D_r = D, 4D, 16D buy in loss?
Expected (MoLE paper, Table 5): wider experts help (160M MoLE-4E: D_r = D / 4D / 16D ->
39.9 / 40.8 / 41.4 average accuracy) at no inference cost.

    python launch.py sweep --config=experiments/expert_width.py:size=tiny,steps=600,seeds=3 \
        --workdir=runs/expert_width
"""

from experiments._study import by_group, knobs, mean, run
from mole_jax.sweeps.claims import Claim

WIDTHS = (1, 4, 16)

# The paper's direction at each step (its accuracy rises 39.9 -> 40.8 -> 41.4); declared after
# the shipped runs (experiments/results/studies/expert_width): post hoc for them.
CLAIMS = [
    Claim("width-4d", "width-1d", source="MoLE Table 5: D_r = 4D 40.8 vs D 39.9"),
    Claim("width-16d", "width-4d", source="MoLE Table 5: D_r = 16D 41.4 vs 4D 40.8"),
]


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, experts=4, seeds=3)


def get_sweep(c):
    fp16 = dict(name="LUT fp16 offloaded", export="float16")
    return [
        dict(run(f"width-{w}d", "mole", c, evals=[fp16], experts=c.experts, width=w), seeds=c.seeds)
        for w in WIDTHS
    ]


def report(rows):
    """Descriptive: each width's mean loss, and the LUT's bytes per token (equal by design)."""
    g = by_group(rows)
    bytes_per_token = {r["evals"]["LUT fp16 offloaded"]["bytes_per_token"] for r in rows}
    means = ", ".join(f"{n} {mean(g[n]):.4f}" for n in (f"width-{w}d" for w in WIDTHS) if n in g)
    return "\n".join(
        [
            f"- mean validation loss: {means}",
            f"- LUT bytes per token the same for every width: {len(bytes_per_token) == 1} "
            f"({', '.join(f'{b:,}' for b in sorted(bytes_per_token))})",
        ]
    )
