"""Bytes per device of a training step on a mesh of any size, without the devices.

    params      the float32 parameters as the rules table shards them (`sharding.RULES`)
    grads       one float32 gradient per parameter, sharded alike
    opt_state   AdamW's two float32 moments, sharded alike
    activations what the backward pass keeps of one micro-batch, plus the peak of one layer, the
                loss's logits and (MoLE) the step's token tables; see `activation_bytes`
Parameters come from the model built abstractly (`nnx.eval_shape`) and their logical axes; the
activation figure is an estimate in closed form, checked against XLA's own `memory_analysis()`
of the compiled step in the tests.
"""

from __future__ import annotations

import math
import types

import jax
from flax import nnx

from mole_jax.model import abstract_model
from mole_jax.model_config import model_config
from mole_jax.sharding import BATCH_AXES, MESH_AXES, RULES, logical_spec


def _split(spec_entry, sizes: dict[str, int]) -> int:
    if spec_entry is None:
        return 1
    axes = spec_entry if isinstance(spec_entry, tuple) else (spec_entry,)
    return math.prod(sizes[a] for a in axes)


def param_bytes(m, sizes: dict[str, int]) -> int:
    """float32 parameter bytes one device holds when `sizes` ({mesh axis: size}) shards them."""
    mesh = types.SimpleNamespace(shape=sizes)
    state = nnx.state(abstract_model(m), nnx.Param)
    total = 0
    for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        names = var.get_metadata().get("logical_axes") or (None,) * len(var.shape)
        spec = logical_spec(names, mesh)
        shard = [math.ceil(n / _split(s, sizes)) for n, s in zip(var.shape, spec, strict=False)]
        total += math.prod(shard) * 4
    return total


def activation_bytes(cfg, sizes: dict[str, int]) -> int:
    """What the backward pass holds for one micro-batch on one device (an estimate).

    Per layer, with T tokens on the device and c bytes per compute value: the residual stream
    and attention's projections and output (9 T D c), its float32 scores and probabilities
    (2 B H L^2 4), and the FFN's hidden activations (2 T F c; MoE: K of width F_e plus the
    permuted copies; MoLE: the shared FFN, E rows per position and the gates; PEER: the gathered
    rows). remat='full' keeps only each layer's input (T D c) and adds one layer's worth for
    the recomputation. Then the loss's float32 logits (3 B chunk V 4: logits, softmax, their
    gradient) and, for MoLE, the step's token tables and their expert hidden states.
    """
    m = model_config(cfg)
    t = cfg.train
    b = t.batch_size // t.microbatches // math.prod(sizes[a] for a in BATCH_AXES)
    seq, d, h, v = cfg.data.seq_len, m.d_model, m.n_heads, m.vocab_size
    tokens, c = b * seq, (2 if m.dtype == "bfloat16" else 4)
    tp = sizes["tensor"]
    attn = 9 * tokens * d * c + 2 * b * (h / tp) * seq * seq * 4
    per_layer = [attn + _ffn_activations(m, i, tokens, c, sizes) for i in range(m.n_layers)]
    if m.remat == "none":
        layers = sum(per_layer)
    else:
        layers = m.n_layers * tokens * d * c + max(per_layer)
    chunk = t.loss_chunk or seq
    logits = 3 * b * chunk * math.ceil(v / tp) * 4
    return int(layers + logits + _table_bytes(m, cfg, sizes))


def _ffn_activations(m, layer: int, tokens: int, c: int, sizes: dict[str, int]) -> float:
    kind, tp = m.kind_of_layer(layer), sizes["tensor"]
    dense = 2 * tokens * (m.d_ff / tp) * c
    if kind == "moe":
        s = m.ffn
        assigned = tokens * s.topk * sizes["expert"]  # each device sees its expert group's tokens
        routed = assigned * (2 * s.d_expert / tp + 2 * m.d_model) * c
        shared = 2 * tokens * s.shared_d_ff / tp * c
        return routed + shared + tokens * s.experts * 4 * 3
    if kind == "mole":
        s = m.ffn
        return dense + tokens * s.experts * (m.d_model * c + 4 * 3)
    if kind == "peer":
        s = m.ffn
        return tokens * s.heads * s.topk * (2 * m.d_model + 2) * c + tokens * s.heads * s.d_key * 4
    return dense


def _table_bytes(m, cfg, sizes: dict[str, int]) -> float:
    """MoLE's step-level token tables: one row per distinct id of the step (at most the
    vocabulary or the step's tokens), E x D per layer, split over the `table` and `experts`
    axes, with the experts' hidden states kept for the pull-back."""
    if m.kind != "mole" or m.ffn.impl != "unique" or m.ffn.expert_input != "embedding":
        return 0.0
    rows = min(m.vocab_size, cfg.train.batch_size * cfg.data.seq_len)
    rows = math.ceil(rows / _split(tuple(RULES["table"]), sizes))
    e = math.ceil(m.ffn.experts / sizes["expert"])
    c = 2 if m.dtype == "bfloat16" else 4
    per_layer = rows * e * (m.d_model + 2 * m.ffn.d_expert) * c
    return per_layer * len(m.ffn_layers)


def plan(cfg, sizes: dict[str, int]) -> dict:
    """{'params', 'grads', 'opt_state', 'activations', 'total'}: bytes per device."""
    params = param_bytes(model_config(cfg), sizes)
    out = dict(params=params, grads=params, opt_state=2 * params)
    out["activations"] = activation_bytes(cfg, sizes)
    out["total"] = sum(out.values())
    return out


def mesh_sizes(mesh_cfg, n_devices: int | None = None) -> dict[str, int]:
    """{axis: size} of `cfg.mesh`, its -1 axis filled up to `n_devices` (default: as if 1)."""
    from mole_jax.sharding import mesh_shape

    fixed = math.prod(max(1, mesh_cfg[a]) for a in MESH_AXES)
    return mesh_shape(mesh_cfg, n_devices or fixed)
