"""Dense baseline: every block has a non-gated GELU FFN of width d_ff.

python launch.py train --config=configs/dense.py:size=tiny --workdir=runs/dense
"""

from configs import common
from mole_jax.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, dict(size="tiny"))
    c = common.base(a.size)
    c.model.ffn.kind = "dense"
    c.lock()
    return c
