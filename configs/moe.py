"""Top-k MoE baseline of the MoLE paper: no shared expert, experts of width d_ff/2, top-2, so the
activated parameters equal dense; load-balance 0.01 and z-loss 0.001.

    configs/moe.py:size=160m,experts=10,topk=2   # MoE-10E (0.39 B params in training)
    configs/moe.py:size=160m,experts=34          # MoE-34E (1.07 B)
    configs/moe.py:size=tiny,experts=8,topk=2,routing=expert_choice   # the PEER paper's baseline
"""

from ml_collections import ConfigDict

from configs import common
from mole_jax.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, dict(size="tiny", experts=10, topk=2, shared=0, routing="token_choice"))
    c = common.base(a.size)
    c.model.ffn.kind = "moe"
    c.model.ffn.moe = ConfigDict(
        dict(
            experts=a.experts,
            topk=a.topk,
            d_expert=c.model.d_ff // 2,  # paper: F/2, so top-2 activates as many params as dense
            shared_d_ff=a.shared * c.model.d_ff,  # width of an always-on shared expert (0: none)
            router_mode="topk_softmax",  # paper; or softmax_topk (softmax over all, then top-k)
            routing=a.routing,  # token_choice | expert_choice (not causal: model/ffn/moe.py)
            lb_coef=0.01 if a.routing == "token_choice" else 0.0,  # EC is balanced as built
            z_coef=0.001,
            dispatch="dropless",  # dropless | capacity
            grouped="auto",  # dropless grouped matmul: auto | ragged | blocked
            capacity_factor=1.25,  # capacity dispatch only
            tile=128,  # rows per tile of the blocked grouped matmul
        )
    )
    c.lock()
    return c
