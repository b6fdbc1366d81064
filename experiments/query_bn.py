r"""Query BatchNorm in PEER (the PEER paper's Table 2, at CPU scale).

Question: does batch-normalising PEER's query improve perplexity and spread the router's mass
over more experts (usage: share of experts chosen at least once over the validation set;
unevenness: KL of the accumulated router mass from uniform)?
Expected (PEER paper, Table 2): with query BN, higher usage, lower unevenness and lower
perplexity, more so for larger pools.

    python launch.py sweep --config=experiments/query_bn.py:size=tiny,steps=600,seeds=3 \
        --workdir=runs/query_bn
"""

from experiments._study import by_group, knobs, mean, run
from mole_jax.sweeps.claims import Claim

KEYS = (32, 64)

# The paper's direction on the loss at each pool size (usage and unevenness are reported, not
# tested). Declared after the shipped runs (experiments/results/studies/query_bn): post hoc.
CLAIMS = [
    Claim(f"n{n}-bn-on", f"n{n}-bn-off", source="PEER Table 2: query BN lowers perplexity")
    for n in KEYS
]


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, heads=8, topk=16, seeds=3)


def get_sweep(c):
    usage = dict(name="eval", mode="experts")
    runs = []
    for n in KEYS:
        for bn in (True, False):
            r = run(f"n{n}-bn-{'on' if bn else 'off'}", "peer", c, evals=[usage], keys=n,
                    heads=c.heads, topk=c.topk)  # fmt: skip
            r["set"]["model.ffn.peer.query_bn"] = bn
            runs.append(dict(r, seeds=c.seeds))
    return runs


def _usage(rows, key) -> str:
    vals = [v for r in rows for k, v in r["evals"]["eval"].items() if k.startswith(key)]
    return f"{sum(vals) / len(vals):.3f}" if vals else "-"


def report(rows):
    """Descriptive: per pool, the mean loss, usage and unevenness with and without query BN."""
    g, lines = by_group(rows), []
    for n in KEYS:
        on, off = f"n{n}-bn-on", f"n{n}-bn-off"
        lines.append(f"- N={n}^2 mean validation loss on / off: {mean(g[on]):.4f} / "
                     f"{mean(g[off]):.4f}")  # fmt: skip
        use = [_usage(g[x], "usage/") for x in (on, off)]
        uneven = [_usage(g[x], "unevenness/") for x in (on, off)]
        lines.append(f"- N={n}^2 usage on / off: {' / '.join(use)}; "
                     f"unevenness on / off: {' / '.join(uneven)}")  # fmt: skip
    return "\n".join(lines)
