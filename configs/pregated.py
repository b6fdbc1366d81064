"""Read-ME's pre-gated MoE: one small causal router over the token ids picks each token's path
(expert i of every block) before the backbone runs; top-1 by default, with an optional always-on
permanent expert. The router is a 1-layer transformer of width max(32, d_model/4) (Read-ME Table
1: 512 beside a 4096-wide Llama-2), its heads 32 wide.

From scratch (`convert=0`): active parameters equal dense: without a permanent expert each expert
is d_ff wide; with one, the permanent expert and each routed expert are d_ff/2; the gate is the
path's probability, with load-balance and z-losses.
Converted from a trained dense model (`convert=1`, `launch.py convert`; Read-ME's method): one
expert per calibration domain (`convert.domains`), each d_ff/2 wide (d_ff/4 beside a permanent
expert of d_ff/4 with `permanent=1`), hard routing (`gate=one`, as Read-ME's code), no aux losses
(the router is trained by distillation); `convert.*` sets the calibration and the alternating
router/expert tuning rounds (Read-ME Table 2, scaled down).

    configs/pregated.py:size=tiny,experts=4                 # 4 paths, top-1, from scratch
    configs/pregated.py:size=160m,experts=8,permanent=1     # + a permanent expert
    configs/pregated.py:size=tiny,convert=1,permanent=1     # for launch.py convert --from=W
"""

from ml_collections import ConfigDict

from configs import common
from mole_jax.config import parse_arg

DOMAINS = "shakespeare,linux-doc,pydoc"  # the corpora mole_jax fetches (corpora.py)


def get_config(arg=None):
    a = parse_arg(arg, dict(size="tiny", experts=0, topk=1, permanent=0, convert=0))
    c = common.base(a.size)
    d_ff, router_d = c.model.d_ff, max(32, c.model.d_model // 4)
    width = d_ff // (2 if a.convert else 1) // (2 if a.permanent else 1)
    c.model.ffn.kind = "pregated"
    c.model.ffn.pregated = ConfigDict(
        dict(
            experts=a.experts or (len(DOMAINS.split(",")) if a.convert else 4),
            topk=a.topk,
            d_expert=width,
            permanent=width if a.permanent else 0,  # width of the always-on expert
            router_d=router_d,
            router_heads=max(1, router_d // 32),
            router_mode="softmax_topk",  # top-k of the softmax over all paths
            gate="one" if a.convert else "prob",  # one: hard routing | prob: the probability
            lb_coef=0.0 if a.convert else 0.01,
            z_coef=0.0 if a.convert else 0.001,
            grouped="auto",  # dropless grouped matmul: auto | ragged | blocked
            tile=128,
        )
    )
    c.convert = ConfigDict(
        dict(
            domains=DOMAINS,  # one corpus per expert (corpora.py names or files:<glob>)
            calib_windows=16,  # data.seq_len windows per domain for channel selection
            rounds=2,  # router tuning then expert tuning, alternating (Read-ME: 8)
            router_steps=50,  # Read-ME: 100 at LR 5e-4
            router_lr=5e-4,
            expert_steps=100,  # Read-ME: 200 at LR 5e-5
            expert_lr=5e-5,
            round_decay=0.8,  # both learning rates x0.8 per round; cosine within a round
            weight_decay=0.01,
        )
    )
    c.lock()
    return c
