r"""Number of MoLE experts (the MoLE paper's expert-count ablation, at CPU scale).

Question: with the shared FFN and the expert width fixed, how does MoLE's validation loss move as
the number of routed experts E grows? Inference cost does not change with E (the LUT row of a
token grows, E*D values per layer, but no FLOPs are added); training parameters do.
Expected (MoLE paper, Table 6): MoLE improves with E (160M: E = 2/4/8/16/32 -> 39.7 / 40.8 /
41.1 / 41.9 / 42.3 average accuracy), with diminishing returns. A dense run is the E = 0 reference.

Claim (`CLAIMS`): validation loss falls per doubling of E over the MoLE runs, one paired slope per
seed. It was declared after the shipped 3-seed runs (experiments/results/studies/
num_experts_3seeds): an earlier slope test over all 15 runs was added in the same commit that
reported every single step inside the spread, so it was post hoc; the declared test replaces it,
and a re-run with fresh seeds would be its first confirmatory use.

    python launch.py sweep --config=experiments/num_experts.py:size=tiny,steps=600,seeds=3 \
        --workdir=runs/num_experts
"""

from experiments._study import by_group, knobs, mean, run
from mole_jax.sweeps.claims import Trend

COUNTS = (2, 4, 8, 16, 32)  # the default `experts`, the points of the declared trend


def CLAIMS(c):  # a function of the study's knobs: the expert counts swept
    counts = [int(e) for e in str(c.experts).split(",") if e]
    source = "MoLE Table 6: E = 2/4/8/16/32 -> 39.7 / 40.8 / 41.1 / 41.9 / 42.3"
    return [Trend(tuple((f"mole-{e}e", e) for e in counts), "E", source=source)]


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, experts=",".join(map(str, COUNTS)), seeds=3)


def get_sweep(c):
    counts = [int(e) for e in str(c.experts).split(",") if e]
    runs = [run("dense", "dense", c)] + [run(f"mole-{e}e", "mole", c, experts=e) for e in counts]
    return [dict(r, seeds=c.seeds) for r in runs]


def report(rows):
    """Descriptive: the mean loss at each E and dense's (the trend is the declared claim)."""
    groups = by_group(rows)
    counts = sorted(int(n[5:-1]) for n in groups if n.startswith("mole-"))
    line = ", ".join(f"E={e}: {mean(groups[f'mole-{e}e']):.4f}" for e in counts)
    dense = f" (dense {mean(groups['dense']):.4f})" if "dense" in groups else ""
    return f"- mean validation loss by E: {line}{dense}"
