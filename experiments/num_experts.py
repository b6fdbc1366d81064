r"""Number of MoLE experts (the MoLE paper's expert-count ablation, at CPU scale).

Question: with the shared FFN and the expert width fixed, how does MoLE's validation loss move as
the number of routed experts E grows? Inference cost does not change with E (the LUT row of a
token grows, E*D values per layer, but no FLOPs are added); training parameters do.
Expected (MoLE paper, Table 6): MoLE improves with E (160M: E = 2/4/8/16/32 -> 39.7 / 40.8 /
41.1 / 41.9 / 42.3 average accuracy), with diminishing returns. A dense run is the E = 0 reference.

    python launch.py sweep --config=experiments/num_experts.py:size=tiny,steps=600,seeds=3 \
        --workdir=runs/num_experts
"""

from experiments._study import by_group, claim, knobs, mean, run, trend


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, experts="2,4,8,16,32", seeds=3)


def get_sweep(c):
    counts = [int(e) for e in str(c.experts).split(",") if e]
    runs = [run("dense", "dense", c)] + [run(f"mole-{e}e", "mole", c, experts=e) for e in counts]
    return [dict(r, seeds=c.seeds) for r in runs]


def report(rows):
    groups = by_group(rows)
    counts = sorted(int(n[5:-1]) for n in groups if n.startswith("mole-"))
    line = ", ".join(f"E={e}: {mean(groups[f'mole-{e}e']):.4f}" for e in counts)
    lines = [f"- mean validation loss by E: {line} (dense {mean(groups['dense']):.4f})"]
    pairs = [("dense", f"mole-{counts[0]}e")]
    pairs += [(f"mole-{a}e", f"mole-{b}e") for a, b in zip(counts, counts[1:], strict=False)]
    lines += [f"- {b} below {a}: {claim(rows, b, a)}" for a, b in pairs]
    points = [(e, r) for e in counts for r in groups[f"mole-{e}e"]]
    return "\n".join(lines + [trend(points, "E")])
