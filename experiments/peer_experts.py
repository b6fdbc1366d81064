r"""Number of PEER experts at fixed heads x top-k (the PEER paper's Fig. 3a, at CPU scale).

Question: with h = 8 heads and k = 16 experts per head fixed (the same active parameters and
FLOPs), how does the loss move as the pool grows from N = 16^2 to 128^2 single-neuron experts?
Expected (PEER paper, Fig. 3a): more experts -> lower perplexity, interpolating between the dense
backbone and the largest pool.

    python launch.py sweep --config=experiments/peer_experts.py:size=tiny,steps=600,seeds=2 \
        --workdir=runs/peer_experts
"""

from experiments._study import by_group, claim, knobs, mean, run, trend

KEYS = (16, 32, 64, 128)


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, heads=8, topk=16, seeds=3)


def get_sweep(c):
    usage = dict(name="eval", mode="experts")  # usage / unevenness over the validation set
    runs = [run("dense", "dense", c)]
    runs += [run(f"peer-{n}x{n}", "peer", c, evals=[usage], keys=n, heads=c.heads, topk=c.topk)
             for n in KEYS]  # fmt: skip
    return [dict(r, seeds=c.seeds) for r in runs]


def report(rows):
    g = by_group(rows)
    line = ", ".join(f"N={n}^2: {mean(g[f'peer-{n}x{n}']):.4f}" for n in KEYS)
    names = ["dense"] + [f"peer-{n}x{n}" for n in KEYS]
    points = [(n * n, r) for n in KEYS for r in g.get(f"peer-{n}x{n}", [])]
    return "\n".join(
        [f"- mean validation loss by N: {line} (dense {mean(g['dense']):.4f})"]
        + [f"- {b} below {a} (claim: a larger pool helps): {claim(rows, b, a)}"
           for a, b in zip(names, names[1:], strict=False)]
        + [trend(points, "N")]
    )  # fmt: skip
