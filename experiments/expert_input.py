r"""What the routed experts read: the token embedding (MoLE) or the hidden state (Table 7).

Question: how much quality does MoLE give up by feeding its routed experts the token embedding
instead of the layer's hidden state, which is what makes them lookup tables, and is the
re-parameterisation into a LUT exact?
Expected (MoLE paper, Table 7): experts reading the hidden state score a little higher (41.5 vs
40.8 at 160M); the LUT changes nothing (40.8 -> 40.8). Here: `hidden` at or below `embedding` in
loss, and the LUT held in memory (float32) equal to the trained model within float rounding.

    python launch.py sweep --config=experiments/expert_input.py:size=tiny,steps=600 \
        --workdir=runs/expert_input
"""

from experiments._study import knobs, run, val
from mole_jax.sweeps.claims import Claim

# The paper's direction (one seed here: the verdict says there is no spread; structure.py tests
# the same two models over 3 seeds). The LUT's exactness is a measurement, reported below.
CLAIMS = [Claim("hidden", "embedding", source="MoLE Table 7: hidden 41.5 vs embedding 40.8")]


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, experts=4)


def get_sweep(c):
    lut = dict(name="LUT fp32 in memory", export="float32", mode="lut_memory")
    return [
        run("embedding", "mole", c, evals=[lut], experts=c.experts, input="embedding"),
        run("hidden", "mole", c, experts=c.experts, input="hidden"),
    ]


def report(rows):
    """Descriptive, one seed: embedding minus hidden, and the LUT's distance from the model."""
    v = val(rows)
    emb = next(r for r in rows if r["name"] == "embedding")
    lut = emb["evals"]["LUT fp32 in memory"]["loss"]
    return "\n".join(
        [
            f"- embedding minus hidden: {v['embedding'] - v['hidden']:+.4f} "
            "(positive: reading the hidden state is better)",
            f"- LUT (fp32, in memory) minus trained model: {lut - v['embedding']:+.2e}",
        ]
    )
