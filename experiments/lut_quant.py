r"""LUT quantisation (the MoLE paper's Table 8, at CPU scale).

Question: what does storing the lookup tables in fewer bits cost in validation loss, against
what it saves in bytes read per token? One MoLE-4E run is exported in every LUT dtype and
evaluated with the rows read from storage.
Expected (MoLE paper, Table 8): 4-bit tables cost almost nothing (NF4 block 768: 40.9 vs fp16
40.8 at 160M) for a quarter of the bytes, NF3 (block 128) a little more; float16 / bfloat16
equal float32 to within their rounding.

    python launch.py sweep --config=experiments/lut_quant.py:size=tiny,steps=600 \
        --workdir=runs/lut_quant
"""

from experiments._study import knobs, run, val
from mole_jax.stores.quant import DTYPES

# A measurement: one trained model exported in each dtype, so each cost is exact for that model
# and there is no seed variation to test against; the paper's "4-bit costs almost nothing" is
# no direction either. No claim declared.
CLAIMS = []


def get_config(arg=None):
    return knobs(arg, size="tiny", steps=600, experts=4)


def get_sweep(c):
    """As published: NF4 in blocks of 768 and NF3 in blocks of 128, or of D when D is smaller
    (D = 64 at tiny, 256 at small)."""
    from configs import common

    d = common.base(c.size).model.d_model
    evals = [dict(name=dt, export=dt) for dt in DTYPES]
    r = run("mole", "mole", c, evals=evals, experts=c.experts)
    r["set"].update(
        {"model.ffn.mole.nf4_block": min(768, d), "model.ffn.mole.nf3_block": min(128, d)}
    )
    return [r]


def report(rows):
    ref = val(rows)["mole"]
    ev = rows[0]["evals"]
    lines = [f"- in memory (trained experts): {ref:.5f}"]
    for d in DTYPES:
        e = ev[d]
        lines.append(
            f"- {d}: {e['loss']:.5f} ({e['loss'] - ref:+.2e}), {e['bytes_per_token']:,} bytes per "
            f"token ({e['bytes_per_token'] / ev['float16']['bytes_per_token']:.2f}x float16)"
        )
    return "\n".join(lines)
