r"""PEER granularity: heads x top-k from 32 to 512 (the PEER paper's Fig. 3b, at CPU scale).

Question: with the pool fixed (N = 64^2 here), how does the loss move as the number of active
single-neuron experts h x k grows, h and k varied jointly?
Expected (PEER paper, Fig. 3b): more active experts help, with diminishing returns.

    python launch.py sweep --config=experiments/peer_granularity.py:size=tiny,steps=600,seeds=3 \
        --workdir=runs/peer_granularity
"""

from experiments._study import by_group, knobs, mean, run
from mole_jax.sweeps.claims import Trend

HEADS_TOPK = ((2, 16), (4, 16), (8, 16), (8, 32), (16, 32))  # h*k = 32 .. 512

# The paper's direction: loss falls as h*k grows (one paired slope per seed). Declared after the
# shipped runs (experiments/results/studies/peer_granularity): post hoc for them.
CLAIMS = [
    Trend(tuple((f"hk-{h * k}", h * k) for h, k in HEADS_TOPK), "h·k",
          source="PEER Fig. 3b: more active experts, lower perplexity"),
]  # fmt: skip


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, sub_keys=64, seeds=3)


def get_sweep(c):
    return [
        dict(run(f"hk-{h * k}", "peer", c, keys=c.sub_keys, heads=h, topk=k), seeds=c.seeds)
        for h, k in HEADS_TOPK
    ]


def report(rows):
    """Descriptive: the mean loss at each h·k (the trend is the declared claim)."""
    g = by_group(rows)
    names = [f"hk-{h * k}" for h, k in HEADS_TOPK]
    return "- mean validation loss by h·k: " + ", ".join(
        f"{n[3:]}: {mean(g[n]):.4f}" for n in names if n in g
    )
