"""MoLE: a shared FFN plus E routed experts that read the token embedding and become lookup
tables after training. All experts are active, softmax routing, no aux loss (the paper's choice).

    configs/mole.py:size=160m,experts=4     # MoLE-4E  (0.39 B params in training)
    configs/mole.py:size=160m,experts=16    # MoLE-16E (1.07 B)
    configs/mole.py:size=tiny,experts=4,input=hidden   # ablation: experts read the hidden state
"""

from ml_collections import ConfigDict

from configs import common
from mole_jax.config import parse_arg


def get_config(arg=None):
    a = parse_arg(arg, dict(size="tiny", experts=4, width=4, input="embedding"))
    c = common.base(a.size)
    c.model.ffn.kind = "mole"
    c.model.ffn.mole = ConfigDict(
        dict(
            experts=a.experts,
            d_expert=a.width * c.model.d_model,  # paper: 4D, the shared FFN's width
            expert_input=a.input,  # embedding (exportable) | hidden (ablation)
            impl="unique",  # unique: experts once per distinct id | per_position: naive
            lb_coef=0.0,  # optional aux losses; the paper found they hurt (Table 4)
            z_coef=0.0,
            nf4_block=64,  # values per absmax scale in nf4 LUT exports (Table 8 used 768)
            nf3_block=min(128, c.model.d_model),  # the same for nf3 (Table 8: 128)
        )
    )
    c.lock()
    return c
