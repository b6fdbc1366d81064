"""PEER: product-key retrieval over keys^2 single-neuron experts, in the middle block by default.

configs/peer.py:size=tiny,keys=128,heads=8,topk=16    # N = 128^2 = 16,384 experts
configs/peer.py:size=160m                             # N = 1024^2, h = 8, k = 16 (paper)
"""

from ml_collections import ConfigDict

from configs import common
from mole_jax.config import CPU_SIZES, parse_arg


def get_config(arg=None):
    a = parse_arg(arg, dict(size="tiny", keys=0, heads=8, topk=16))
    c = common.base(a.size)
    c.model.ffn.kind = "peer"
    c.model.ffn.layers = "middle"  # the paper replaces only the middle block's FFN
    c.model.ffn.peer = ConfigDict(
        dict(
            # sub-keys per half of the product key; N = sub_keys^2 experts
            sub_keys=a.keys or (128 if a.size in CPU_SIZES else 1024),
            heads=a.heads,
            topk=a.topk,  # experts per head
            d_key=128,  # query/key width (two halves of 64); the paper does not state it
            query_bn=True,  # BatchNorm on the query: batch statistics in training, running in eval
            bn_momentum=0.99,
            shared_keys=True,  # paper: the heads share one set of product keys
            activation="gelu",  # sigma of e(x) = sigma(u.x) v: gelu | relu
        )
    )
    c.lock()
    return c
