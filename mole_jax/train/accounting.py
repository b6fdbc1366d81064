"""Parameter and FLOP accounting for every FFN kind, without allocating a parameter.

Conventions (the MoLE paper's Table 1): a multiply-add is 2 FLOPs; `flops_per_token` is the
forward pass of the inference form at context length `data.seq_len` (attention scores counted
over the full context, 4*seq*D per layer, as PaLM does); `train_flops_per_token` is 3x the
forward of the training form computed per position. Per-layer FFN numbers come from each
kind's `account(m)`:
  params           parameters in training
  params_resident  parameters in device memory at inference in the kind's intended form
                   (MoE: all experts; MoLE: LUT offloaded, so shared FFN + router only)
  params_active    parameters one token touches at inference
  flops / train_flops, lut_values, lut_values_per_token (MoLE)
"""

from __future__ import annotations

import jax
from flax import nnx

from mole_jax.model import ffn as ffn_lib
from mole_jax.model.backbone import abstract_model
from mole_jax.model.config import model_config
from mole_jax.train import memory

BYTES_PER_VALUE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "nf4": 0.5, "nf3": 0.375}


def count_params(m) -> int:
    """Exact parameter count of the typed model config, by abstract evaluation of the model."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(abstract_model(m), nnx.Param))))


def summarize(cfg, n_devices: int | None = None, platform: str | None = None) -> dict:
    """The accounting of a run config (its model at context `data.seq_len`), with the bytes
    per device of its training step on `cfg.mesh` over `n_devices` (default: the mesh's fixed
    axes, its -1 axis as 1) on `platform` ('cpu' | 'gpu' | 'tpu'; default: this host's)."""
    m = model_config(cfg)
    d, v, seq = m.d_model, m.vocab_size, cfg.data.seq_len
    attn_params = 2 * d * d + 2 * d * m.kv_heads * m.head_dim  # q, o; k, v (fewer with GQA)
    attn_flops = 2 * attn_params + 4 * seq * d
    tot = dict(params=0, params_resident=0, params_active=0, flops=0, train_flops=0)
    lut_values = lut_per_token = 0
    kinds = []
    for i in range(m.n_layers):
        kind = m.kind_of_layer(i)
        kinds.append(kind)
        a = ffn_lib.KINDS[kind].account(m)
        norms = 2 * d + a.get("norm_params", 0)
        tot["params"] += attn_params + norms + a["params"]
        tot["params_resident"] += attn_params + 2 * d + a["params_resident"]
        tot["params_active"] += attn_params + 2 * d + a["params_active"]
        tot["flops"] += attn_flops + a["flops"]
        tot["train_flops"] += attn_flops + a.get("train_flops", a["flops"])
        lut_values += a.get("lut_values", 0)
        lut_per_token += a.get("lut_values_per_token", 0)
    embed_head = (1 if m.tie_embeddings else 2) * v * d + d  # embedding (+ head), final norm
    if (kind := ffn_lib.router_module(m.kind)) is not None:  # a model-level router (pregated)
        r = kind.account_model(m, seq)
        embed_head += r["params"]
        for key in ("flops", "train_flops"):
            tot[key] += r["flops"]
    out = {
        "kind": m.kind,
        "layer_kinds": kinds,
        "params_total": count_params(m),
        "params_total_formula": tot["params"] + embed_head,
        "params_resident": tot["params_resident"] + embed_head,
        "params_active_per_token": tot["params_active"] + embed_head,
        "flops_per_token": tot["flops"] + 2 * v * d,
        "train_flops_per_token": 3 * (tot["train_flops"] + 2 * v * d),
        "seq_len": seq,
        "vocab_size": v,
    }
    if "mesh" in cfg:
        sizes = memory.mesh_sizes(cfg.mesh, n_devices)
        out["mesh"] = sizes
        out["platform"] = platform or jax.default_backend()
        out["bytes_per_device"] = memory.plan(cfg, sizes, out["platform"])
    if lut_values:
        out["lut_values"] = lut_values
        out["lut_values_per_token"] = lut_per_token
        out["lut_bytes"] = {k: lut_bytes(lut_values, d, k, m) for k in BYTES_PER_VALUE}
        out["lut_bytes_per_token"] = {k: lut_bytes(lut_per_token, d, k, m) for k in BYTES_PER_VALUE}
    return out


def lut_block(m, dtype: str) -> int:
    """Values per absmax scale of a LUT stored in nf4 / nf3 (what the store records as its
    block for the other dtypes too, which do not use it)."""
    if m.kind != "mole":
        return 64
    return m.ffn.nf3_block if dtype == "nf3" else m.ffn.nf4_block


def lut_bytes(values: int, d: int, dtype: str, m) -> int:
    """Stored bytes of `values` LUT values.

    int8 adds one float32 scale per D-row; nf4 / nf3 one float16 absmax per block of
    `model.ffn.mole.nf4_block` / `nf3_block` values (as QLoRA, without double quantisation).
    """
    size = values * BYTES_PER_VALUE[dtype]
    if dtype == "int8":
        size += values // d * 4
    if dtype in ("nf4", "nf3"):
        block = lut_block(m, dtype)
        size += -(-values // block) * 2
    return int(size)
