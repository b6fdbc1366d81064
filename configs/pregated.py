"""Read-ME's pre-gated MoE trained from scratch: one small causal router over the token ids picks
each token's path (expert i of every block) before the backbone runs; top-1 by default, with an
optional always-on permanent expert. Active parameters equal dense: without a permanent expert
each expert is d_ff wide; with one, the permanent expert and each routed expert are d_ff/2.
The router is a 1-layer transformer of width max(32, d_model/4) (Read-ME Table 1: 512 beside a
4096-wide Llama-2), its heads 32 wide.

    configs/pregated.py:size=tiny,experts=4                 # 4 paths, top-1
    configs/pregated.py:size=160m,experts=8,permanent=1     # + a permanent expert
"""

from ml_collections import ConfigDict

from configs import common
from mole_jax.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, dict(size="tiny", experts=4, topk=1, permanent=0))
    c = common.base(a.size)
    d_ff, router_d = c.model.d_ff, max(32, c.model.d_model // 4)
    c.model.ffn.kind = "pregated"
    c.model.ffn.pregated = ConfigDict(
        dict(
            experts=a.experts,
            topk=a.topk,
            d_expert=d_ff // 2 if a.permanent else d_ff,
            permanent=d_ff // 2 if a.permanent else 0,  # width of the always-on expert
            router_d=router_d,
            router_heads=max(1, router_d // 32),
            router_mode="softmax_topk",  # gate = the path's probability (the LM loss trains it)
            lb_coef=0.01,
            z_coef=0.001,
            grouped="auto",  # dropless grouped matmul: auto | ragged | blocked
            tile=128,
        )
    )
    c.lock()
    return c
