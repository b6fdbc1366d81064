r"""Number of PEER experts at fixed heads x top-k (the PEER paper's Fig. 3a, at CPU scale).

Question: with h = 8 heads and k = 16 experts per head fixed (the same active parameters and
FLOPs), how does the loss move as the pool grows from N = 16^2 to 128^2 single-neuron experts?
Expected (PAPERS.md, Fig. 3a): more experts -> lower perplexity, interpolating between the dense
backbone and the largest pool.

    python launch.py sweep --config=experiments/peer_experts.py:size=tiny,steps=600,seeds=2 \
        --workdir=runs/peer_experts
"""

from experiments._study import by_group, knobs, run, verdict

KEYS = (16, 32, 64, 128)


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, heads=8, topk=16, seeds=2)


def get_sweep(c):
    usage = dict(name="eval", mode="experts")  # usage / unevenness over the validation set
    runs = [run("dense", "dense", c)]
    runs += [run(f"peer-{n}x{n}", "peer", c, evals=[usage], keys=n, heads=c.heads, topk=c.topk)
             for n in KEYS]  # fmt: skip
    return [dict(r, seeds=c.seeds) for r in runs]


def _mean(rows, value) -> float:
    return sum(value(r) for r in rows) / len(rows)


def report(rows):
    g = by_group(rows)
    losses = [(n, _mean(g[f"peer-{n}x{n}"], lambda r: r["val_loss"])) for n in KEYS]
    falls = all(b < a for (_, a), (_, b) in zip(losses, losses[1:], strict=False))
    line = ", ".join(f"N={n}^2: {v:.4f}" for n, v in losses)
    dense = _mean(g["dense"], lambda r: r["val_loss"])
    return (
        f"- mean validation loss by N: {line} (dense {dense:.4f})\n"
        f"- loss falls with every larger pool: {verdict(falls)}"
    )
