"""PKM: a product-key memory of keys^2 value vectors in the middle block (PEER's baseline).

configs/pkm.py:size=tiny,keys=128,heads=8,topk=32     # N = 128^2 = 16,384 memory slots
configs/pkm.py:size=160m                              # N = 1024^2, h = 8, k = 32 (PEER paper)
"""

from ml_collections import ConfigDict

from configs import common
from mole_jax.config import CPU_SIZES, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, dict(size="tiny", keys=0, heads=8, topk=32))
    c = common.base(a.size)
    c.model.ffn.kind = "pkm"
    c.model.ffn.layers = "middle"  # as PEER: only the middle block's FFN is replaced
    c.model.ffn.pkm = ConfigDict(
        dict(
            sub_keys=a.keys or (128 if a.size in CPU_SIZES else 1024),
            heads=a.heads,
            topk=a.topk,  # slots read per head (PEER paper's PKM: 32)
            d_key=128,  # query/key width (two halves of 64); Lample et al. use 512
            query_bn=True,  # BatchNorm on the query (PEER paper's PKM baseline)
            bn_momentum=0.99,
            shared_keys=False,
        )
    )
    c.lock()
    return c
