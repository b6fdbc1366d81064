"""Hugging Face model families: their config.json as mole_jax model fields, and back, and the
name of every tensor beside the mole_jax parameter it fills.

A family is picked by `config.json`'s `architectures[0]`. The official MoLE release
(github.com/JieShibo/MoLE: `modeling_dense.py`, `modeling_moe.py`, `modeling_mole.py`) is a
`LlamaConfig` plus `num_experts`, with non-gated GELU FFNs hard-coded whatever `hidden_act`
says, pre-norm RMSNorm blocks, NeoX-layout rotary embeddings and an untied LM head:
- dense: `mlp` is the FFN;
- MoE: `experts.<e>` and `router`, top-10 of the router's logits hard-coded (softmax over the
  ten), no shared expert;
- MoLE: `mlp` (the shared expert, on the block's normed hidden state), `experts.<e>` on
  `expert_layernorm(token embedding)`, `router` on the normed hidden state (softmax over all).

A torch `Linear` weight is [out, in]; a mole_jax kernel is [in, out]: every matrix is
transposed on the way in and out. Routed experts are stacked on a leading expert axis.
"""

from __future__ import annotations

import dataclasses

from mole_jax.errors import UserError

OFFICIAL = {"DenseForCausalLM": "dense", "MoeForCausalLM": "moe", "MoleForCausalLM": "mole"}
LLAMA = {"LlamaForCausalLM": "dense", "MixtralForCausalLM": "moe"}  # transformers' own classes
ARCHITECTURES = (*OFFICIAL, *LLAMA)
OFFICIAL_TOPK = 10  # modeling_moe.py: torch.topk(router_logits, 10)
# transformers' hidden_act -> model.activation ('gelu' is the exact erf GELU in both)
ACTIVATIONS = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor: `hf` (its name) fills `path` of the parameter tree (at expert
    `expert` of a stacked leaf when not None, from `offset` on the leaf's last axis: a gated
    expert's `up` holds [gate | up]), transposed when `transpose`."""

    hf: str
    path: tuple
    expert: int | None = None
    transpose: bool = True
    offset: int = 0


def kind_of(hf: dict) -> str:
    return {**OFFICIAL, **LLAMA}[_arch(hf)]


def _arch(hf: dict) -> str:
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ARCHITECTURES:
        raise UserError(
            f"config.json's architecture {arch!r} is not supported (supported: "
            f"{', '.join(ARCHITECTURES)})"
        )
    return arch


# Fields each family's code takes for granted; another value would be ignored by an import
# (and so silently change the model): refused.
FIXED = dict(attention_bias=False, mlp_bias=False, sliding_window=None)
OFFICIAL_FIXED = dict(rope_scaling=None, tie_word_embeddings=False)


def model_fields(hf: dict) -> tuple[dict, dict, list[str]]:
    """(backbone fields, the kind's ffn fields, notes) of a config.json; backbone's `gated`
    is model.ffn.gated."""
    arch, kind = _arch(hf), kind_of(hf)
    official = arch in OFFICIAL
    for name, want in {**FIXED, **(OFFICIAL_FIXED if official else {})}.items():
        if hf.get(name, want) != want:
            raise UserError(
                f"config.json sets {name}={hf[name]!r}; the importer supports only "
                f"{want!r} for {arch}"
            )
    heads, d = _need(hf, "num_attention_heads"), _need(hf, "hidden_size")
    kv = hf.get("num_key_value_heads") or heads
    if official and kv != heads:
        raise UserError(
            f"config.json sets num_key_value_heads={kv} != num_attention_heads; "
            f"{arch} has no grouped-query attention"
        )
    if (hf.get("head_dim") or d // heads) != d // heads:
        raise UserError(f"config.json sets head_dim={hf['head_dim']}, not hidden_size / heads")
    act = hf.get("hidden_act", "silu")
    if not official and act not in ACTIVATIONS:
        raise UserError(f"config.json sets hidden_act={act!r}; supported: {', '.join(ACTIVATIONS)}")
    backbone = dict(
        vocab_size=_need(hf, "vocab_size"),
        d_model=d,
        n_layers=_need(hf, "num_hidden_layers"),
        n_heads=heads,
        n_kv_heads=0 if kv == heads else kv,
        d_ff=_need(hf, "intermediate_size"),
        max_seq_len=_need(hf, "max_position_embeddings"),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation="gelu" if official else ACTIVATIONS[act],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_scaling=_rope_scaling(hf.get("rope_scaling")),
        gated=not official,
    )
    notes = []
    if official and act != "gelu":
        notes.append(f"hidden_act={act!r} is ignored: the official code hard-codes exact GELU")
    return backbone, _ffn_fields(hf, arch, kind, backbone["d_ff"], notes), notes


def _ffn_fields(hf: dict, arch: str, kind: str, d_ff: int, notes: list[str]) -> dict:
    """The kind's `model.ffn.<kind>` fields of a config.json (notes: what the import decided)."""
    if kind == "mole":
        return dict(experts=_need(hf, "num_experts"), d_expert=d_ff, expert_input="embedding")
    if kind != "moe":
        return {}
    if arch == "MixtralForCausalLM":
        experts, topk = _need(hf, "num_local_experts"), _need(hf, "num_experts_per_tok")
        if hf.get("router_jitter_noise"):
            notes.append(
                "router_jitter_noise applies in transformers' training mode only; not imported"
            )
    else:
        experts = _need(hf, "num_experts")
        topk = int(hf.get("num_experts_per_tok", OFFICIAL_TOPK))
        if topk > experts:
            raise UserError(
                f"top-{topk} routing needs at least {topk} experts, not {experts} "
                "(modeling_moe.py hard-codes top-10)"
            )
        if "num_experts_per_tok" not in hf:
            notes.append(
                "top-10 routing, as modeling_moe.py hard-codes (the paper trained top-2: "
                "set num_experts_per_tok in config.json to choose)"
            )
    # every token to its top-k experts, softmax over their logits, nothing dropped (both codes)
    return dict(
        experts=experts,
        topk=topk,
        d_expert=d_ff,
        shared_d_ff=0,
        router_mode="topk_softmax",
        dispatch="dropless",
        routing="token_choice",
    )


def _need(hf: dict, name: str):
    if name not in hf:
        raise UserError(f"config.json lacks {name}")
    return hf[name]


def _rope_scaling(rs) -> str:
    """config.json's rope_scaling as model.rope_scaling ("" or "llama3:factor=...,...")."""
    if rs is None:
        return ""
    kind = rs.get("rope_type", rs.get("type")) if isinstance(rs, dict) else None
    if kind != "llama3" or any(k not in rs for k in ROPE_KEYS):
        raise UserError(
            f"config.json sets rope_scaling={rs}; the importer supports only "
            f"rope_type 'llama3' with {', '.join(ROPE_KEYS)}"
        )
    return "llama3:" + ",".join(f"{k}={rs[k]}" for k in ROPE_KEYS)


def _llama_form(m) -> bool:
    """Whether `m` exports as LlamaForCausalLM (else as the official MoLE family)."""
    return m.gated or bool(m.n_kv_heads) or m.tie_embeddings or bool(m.rope_scaling)


def hf_config(m) -> dict:
    """config.json for the typed model config `m` (the reverse of `model_fields`)."""
    llama = _llama_form(m)
    names = {v: k for k, v in (LLAMA if llama else OFFICIAL).items()}
    arch = names.get(m.kind)
    if arch is None or (m.kind != "dense" and m.ffn_layers != tuple(range(m.n_layers))):
        raise UserError(
            f"a '{m.kind}' model of these fields has no Hugging Face form (the "
            "official MoLE family: dense, moe or mole in every block, non-gated; "
            "Llama: dense, gated)"
        )
    if llama and not m.gated:
        raise UserError("LlamaForCausalLM's FFN is gated: set model.ffn.gated")
    act = {v: k for k, v in ACTIVATIONS.items()}[m.activation]
    if not llama and act != "gelu":
        raise UserError(
            f"model.activation={m.activation}: the official modeling code hard-codes GELU"
        )
    out = dict(
        architectures=[arch],
        model_type="mixtral" if arch == "MixtralForCausalLM" else "llama",
        vocab_size=m.vocab_size,
        hidden_size=m.d_model,
        num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads,
        num_key_value_heads=m.kv_heads,
        intermediate_size=m.d_ff,
        max_position_embeddings=m.max_seq_len,
        rope_theta=m.rope_theta,
        rms_norm_eps=m.norm_eps,
        hidden_act=act,
        tie_word_embeddings=m.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        rope_scaling=_hf_rope_scaling(m.rope_scaling),
        pretraining_tp=1,
        torch_dtype="float32",
    )
    if m.kind == "moe":
        _check_moe(m, llama)
        experts = "num_local_experts" if llama else "num_experts"
        out.update({experts: m.ffn.experts, "num_experts_per_tok": m.ffn.topk})
    if m.kind == "mole":
        if m.ffn.d_expert != m.d_ff or m.ffn.expert_input != "embedding":
            raise UserError(
                "the official MoLE code has experts of intermediate_size on the "
                "token embedding (d_expert == d_ff, expert_input=embedding)"
            )
        out.update(num_experts=m.ffn.experts)
    return out


def _hf_rope_scaling(spec: str):
    if not spec:
        return None
    args = dict(a.split("=") for a in spec.partition(":")[2].split(","))
    out = {k: float(v) for k, v in args.items()}
    out["original_max_position_embeddings"] = int(out["original_max_position_embeddings"])
    return {"rope_type": "llama3", **out}


def _check_moe(m, llama: bool) -> None:
    """A MoE the reference code computes as mole_jax does: experts of intermediate_size, no
    shared expert, softmax over the top-k logits, every token routed (token choice, dropless);
    the official file's hard-coded top-10."""
    c = m.ffn
    same = c.d_expert == m.d_ff and not c.shared_d_ff and c.router_mode == "topk_softmax"
    if not same or c.routing != "token_choice" or c.dispatch != "dropless":
        raise UserError(
            "the reference MoE code has experts of intermediate_size, no shared expert, softmax "
            "over the top-k logits and dropless token-choice routing; this model differs"
        )
    if not llama and c.topk != OFFICIAL_TOPK:
        raise UserError(
            f"modeling_moe.py hard-codes top-{OFFICIAL_TOPK} routing (it ignores "
            f"num_experts_per_tok); this model routes top-{c.topk}, which it would not compute"
        )


def tensors(m) -> list[Tensor]:
    """Every tensor of the checkpoint of `m`, in the official family's names."""
    out = [
        Tensor("model.embed_tokens.weight", ("embed",), transpose=False),
        Tensor("model.norm.weight", ("norm", "scale"), transpose=False),
    ]
    if not m.tie_embeddings:  # (tied: save_pretrained writes no lm_head)
        out.append(Tensor("lm_head.weight", ("head",)))
    for i in range(m.n_layers):
        hf, at = f"model.layers.{i}.", ("blocks", i)
        for name in "qkvo":
            out.append(Tensor(f"{hf}self_attn.{name}_proj.weight", (*at, "attn", name, "kernel")))
        out.append(Tensor(f"{hf}input_layernorm.weight", (*at, "norm_attn", "scale"), None, False))
        out.append(
            Tensor(f"{hf}post_attention_layernorm.weight", (*at, "norm_ffn", "scale"), None, False)
        )
        out += _ffn_tensors(m, hf, (*at, "ffn"))
    return out


def _ffn_tensors(m, hf: str, at: tuple) -> list[Tensor]:
    kind = m.kind_of_layer(int(at[1]))
    if kind == "moe" and _llama_form(m):  # Mixtral: w1 (gate) and w3 (up) fill [gate | up]
        hf, f = f"{hf}block_sparse_moe.", m.ffn.d_expert
        out = [Tensor(f"{hf}gate.weight", (*at, "router"))]
        for e in range(m.ffn.experts):
            x = f"{hf}experts.{e}."
            out += [
                Tensor(f"{x}w1.weight", (*at, "up"), e),
                Tensor(f"{x}w2.weight", (*at, "down"), e),
                Tensor(f"{x}w3.weight", (*at, "up"), e, offset=f),
            ]
        return out
    mlp = ("mlp",) if kind == "dense" else ("shared",)
    out = []
    if m.gated and kind == "dense":
        out.append(Tensor(f"{hf}mlp.gate_proj.weight", (*at, *mlp, "gate", "kernel")))
    if kind in ("dense", "mole"):
        out += [
            Tensor(f"{hf}mlp.{p}_proj.weight", (*at, *mlp, p, "kernel")) for p in ("up", "down")
        ]
    if kind in ("moe", "mole"):
        out.append(Tensor(f"{hf}router.weight", (*at, "router")))
        for e in range(m.ffn.experts):
            out += [Tensor(f"{hf}experts.{e}.{p}_proj.weight", (*at, p), e) for p in ("up", "down")]
    if kind == "mole":
        out.append(Tensor(f"{hf}expert_layernorm.weight", (*at, "norm_exp", "scale"), None, False))
    return out
