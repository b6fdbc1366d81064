r"""Routed expert width (the MoLE paper's Table 5, at CPU scale).

Question: the routed experts' hidden width D_r grows training FLOPs and parameters, but not the
LUT (a token's row is E x D whatever D_r is): what does D_r = D, 4D, 16D buy in loss?
Expected (MoLE paper, Table 5): wider experts help (160M MoLE-4E: D_r = D / 4D / 16D ->
39.9 / 40.8 / 41.4 average accuracy) at no inference cost.

    python launch.py sweep --config=experiments/expert_width.py:size=tiny,steps=600,seeds=3 \
        --workdir=runs/expert_width
"""

from experiments._study import claim, knobs, run

WIDTHS = (1, 4, 16)


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, experts=4, seeds=3)


def get_sweep(c):
    fp16 = dict(name="LUT fp16 offloaded", export="float16")
    return [
        dict(run(f"width-{w}d", "mole", c, evals=[fp16], experts=c.experts, width=w), seeds=c.seeds)
        for w in WIDTHS
    ]


def report(rows):
    bytes_per_token = {r["evals"]["LUT fp16 offloaded"]["bytes_per_token"] for r in rows}
    return "\n".join(
        [
            f"- width-4d below width-1d (claim: 4D helps): {claim(rows, 'width-4d', 'width-1d')}",
            "- width-16d below width-4d (claim: saturates, 'inside the spread' agrees): "
            f"{claim(rows, 'width-16d', 'width-4d')}",
            f"- LUT bytes per token the same for every width: {len(bytes_per_token) == 1} "
            f"({', '.join(f'{b:,}' for b in sorted(bytes_per_token))})",
        ]
    )
