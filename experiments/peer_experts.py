r"""Number of PEER experts at fixed heads x top-k (the PEER paper's Fig. 3a, at CPU scale).

Question: with h = 8 heads and k = 16 experts per head fixed (the same active parameters and
FLOPs), how does the loss move as the pool grows from N = 16^2 to 128^2 single-neuron experts?
Expected (PEER paper, Fig. 3a): more experts -> lower perplexity, interpolating between the dense
backbone and the largest pool.

    python launch.py sweep --config=experiments/peer_experts.py:size=tiny,steps=600,seeds=3 \
        --workdir=runs/peer_experts
"""

from experiments._study import by_group, knobs, mean, run
from mole_jax.sweeps.claims import Claim, Trend

KEYS = (16, 32, 64, 128)

# The paper's direction: loss falls as the pool N grows (one paired slope per seed over the PEER
# runs), and even the smallest pool beats the dense backbone. Declared after the shipped runs
# (experiments/results/studies/peer_experts): post hoc for them.
CLAIMS = [
    Trend(tuple((f"peer-{n}x{n}", n * n) for n in KEYS), "N",
          source="PEER Fig. 3a: more experts, lower perplexity"),
    Claim(f"peer-{KEYS[0]}x{KEYS[0]}", "dense", source="PEER Fig. 3a: PEER below the dense line"),
]  # fmt: skip


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, heads=8, topk=16, seeds=3)


def get_sweep(c):
    usage = dict(name="eval", mode="experts")  # usage / unevenness over the validation set
    runs = [run("dense", "dense", c)]
    runs += [run(f"peer-{n}x{n}", "peer", c, evals=[usage], keys=n, heads=c.heads, topk=c.topk)
             for n in KEYS]  # fmt: skip
    return [dict(r, seeds=c.seeds) for r in runs]


def report(rows):
    """Descriptive: the mean loss at each pool size and dense's (the claims are tested above)."""
    g = by_group(rows)
    names = [f"peer-{n}x{n}" for n in KEYS]
    line = ", ".join(f"N={n[5:].split('x')[0]}^2: {mean(g[n]):.4f}" for n in names if n in g)
    return f"- mean validation loss by N: {line} (dense {mean(g['dense']):.4f})"
