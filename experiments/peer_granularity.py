r"""PEER granularity: heads x top-k from 32 to 512 (the PEER paper's Fig. 3b, at CPU scale).

Question: with the pool fixed (N = 64^2 here), how does the loss move as the number of active
single-neuron experts h x k grows, h and k varied jointly?
Expected (PEER paper, Fig. 3b): more active experts help, with diminishing returns.

    python launch.py sweep --config=experiments/peer_granularity.py:size=tiny,steps=600,seeds=2 \
        --workdir=runs/peer_granularity
"""

from experiments._study import by_group, claim, knobs, run, trend

HEADS_TOPK = ((2, 16), (4, 16), (8, 16), (8, 32), (16, 32))  # h*k = 32 .. 512


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, sub_keys=64, seeds=3)


def get_sweep(c):
    return [
        dict(run(f"hk-{h * k}", "peer", c, keys=c.sub_keys, heads=h, topk=k), seeds=c.seeds)
        for h, k in HEADS_TOPK
    ]


def report(rows):
    names = [f"hk-{h * k}" for h, k in HEADS_TOPK]
    g = by_group(rows)
    points = [(h * k, r) for h, k in HEADS_TOPK for r in g.get(f"hk-{h * k}", [])]
    return "\n".join(
        [f"- {b} below {a} (claim: more active experts help): {claim(rows, b, a)}"
         for a, b in zip(names, names[1:], strict=False)]
        + [trend(points, "h·k")]
    )  # fmt: skip
