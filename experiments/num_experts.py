r"""Number of MoLE experts (the MoLE paper's expert-count ablation, at CPU scale).

Question: with the shared FFN and the expert width fixed, how does MoLE's validation loss move as
the number of routed experts E grows? Inference cost does not change with E (the LUT row of a
token grows, E*D values per layer, but no FLOPs are added); training parameters do.
Expected (PAPERS.md): MoLE improves with E (160M: E = 2/4/8/16/32 -> 39.7 / 40.8 / 41.1 / 41.9 /
42.3 average accuracy), with diminishing returns. A dense run is the E = 0 reference.

    python launch.py sweep --config=experiments/num_experts.py:size=tiny,steps=600 \
        --workdir=runs/num_experts
"""

from experiments._study import knobs, run, val, verdict


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, experts="2,4,8,16,32")


def get_sweep(c):
    counts = [int(e) for e in str(c.experts).split(",") if e]
    return [run("dense", "dense", c)] + [run(f"mole-{e}e", "mole", c, experts=e) for e in counts]


def report(rows):
    v = val(rows)
    moles = [(int(n[5:-1]), loss) for n, loss in v.items() if n.startswith("mole-")]
    losses = [loss for _, loss in sorted(moles)]
    monotone = all(b <= a for a, b in zip(losses, losses[1:], strict=False))
    steps = ", ".join(f"E={e}: {loss:.4f}" for e, loss in sorted(moles))
    return "\n".join(
        [
            f"- validation loss by E: {steps} (dense {v['dense']:.4f})",
            f"- loss falls with every doubling of E: {verdict(monotone)}",
            f"- every MoLE below dense: {verdict(all(loss < v['dense'] for loss in losses))}",
        ]
    )
