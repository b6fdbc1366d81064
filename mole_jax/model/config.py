"""The typed model config: a frozen dataclass made once from the ml_collections config.

`build_model` and every module take a `ModelConfig`; none reads the config tree. The FFN kind's
own fields arrive as the kind's frozen `Settings` (`m.ffn`), so `model/ffn/moe.py` reads
`m.ffn.experts`, never `cfg.model.ffn.moe.experts`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from mole_jax.errors import require
from mole_jax.model.ffn import KINDS, layer_indices


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int
    max_seq_len: int
    rope_theta: float
    init_std: float
    norm_eps: float
    activation: str
    dtype: str  # compute dtype; parameters are float32
    remat: str = "none"  # none | full | dots: what a block saves for the backward (model.REMAT)
    # output projections (attention out, FFN and expert down) drawn with std init_std/sqrt(2L),
    # as the official MoLE code (Megatron) does; False (configs written before it): init_std
    scaled_out_init: bool = False
    scan_layers: bool = False  # runs of identical blocks as one lax.scan (scan.py)
    attention: str = "auto"  # auto | xla | flash: training's attention kernel (flash.py)
    # Llama-family fields (each off by default, as the MoLE paper's models have them):
    n_kv_heads: int = 0  # key/value heads (grouped-query attention); 0: n_heads
    tie_embeddings: bool = False  # the LM head is the embedding table, transposed
    rope_scaling: str = ""  # "" or "llama3:factor=8,low_freq_factor=1,high_freq_factor=4,..."
    gated: bool = False  # model.ffn.gated: down(act(gate(x)) * up(x)) (SwiGLU with silu)
    kind: str = "dense"  # the configured FFN kind, placed in `ffn_layers`; dense elsewhere
    ffn_layers: tuple[int, ...] = ()
    ffn: Any = None  # the kind's frozen Settings (None for dense)

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def causal(self) -> bool:
        """Whether position t's logits depend only on tokens <= t (what decoding and lm-eval's
        scoring need); a kind module may say otherwise through `causal(settings)`."""
        return getattr(KINDS[self.kind], "causal", lambda s: True)(self.ffn)

    def kind_of_layer(self, layer_idx: int) -> str:
        """The FFN kind of block `layer_idx`: the configured kind where placed, dense elsewhere."""
        return self.kind if layer_idx in self.ffn_layers else "dense"


# The backbone's fields, read straight from `cfg.model` (OPTIONAL ones may be absent from
# configs written before they existed).
BACKBONE = tuple(
    f.name for f in dataclasses.fields(ModelConfig) if f.default is dataclasses.MISSING
)
OPTIONAL = (
    "remat",
    "scan_layers",
    "attention",
    "scaled_out_init",
    "n_kv_heads",
    "tie_embeddings",
    "rope_scaling",
)


# Fields added after runs were written, at the values that reproduce those runs: a model section
# without them is the same model as one that has them at these values (resume checks, digests).
LATER_DEFAULTS = {"n_kv_heads": 0, "tie_embeddings": False, "rope_scaling": "", "attention": "auto"}
LATER_FFN_DEFAULTS = {"gated": False}


def comparable(model_section: dict) -> dict:
    """A model section (as JSON) without the later-added fields at their defaults."""
    out = {k: v for k, v in model_section.items() if LATER_DEFAULTS.get(k, ...) != v}
    if isinstance(out.get("ffn"), dict):
        ffn = out["ffn"]
        out["ffn"] = {k: v for k, v in ffn.items() if LATER_FFN_DEFAULTS.get(k, ...) != v}
    return out


def model_config(cfg) -> ModelConfig:
    """The typed config of `cfg.model` (pass the whole run config or its `model` section).

    Raises ConfigError for an unknown kind, a missing `model.ffn.<kind>` section or required
    field, or a bad `model.ffn.layers`. Fields the kind does not know (from older configs) are
    ignored; fields added after a config was written take their Settings default.
    """
    m = cfg.model if "model" in cfg else cfg
    kind = m.ffn.kind
    require(kind in KINDS, f"model.ffn.kind={kind!r} is not one of {', '.join(KINDS)}")
    settings_cls = getattr(KINDS[kind], "Settings", None)
    settings = None
    if settings_cls is not None:
        require(
            kind in m.ffn,
            f"model.ffn.kind={kind!r} needs a model.ffn.{kind} section (use configs/{kind}.py)",
        )
        raw = m.ffn[kind]
        fields = dataclasses.fields(settings_cls)
        names = [f.name for f in fields if f.name in raw]
        missing = [f.name for f in fields if f.name not in raw and _required(f)]
        require(not missing, f"model.ffn.{kind} lacks field(s) {missing} (use configs/{kind}.py)")
        settings = settings_cls(**{n: _frozen(raw[n]) for n in names})
    return ModelConfig(
        **{name: m[name] for name in BACKBONE},
        **{name: m[name] for name in OPTIONAL if name in m},
        gated=bool(m.ffn.get("gated", False)),
        kind=kind,
        ffn_layers=layer_indices(m.ffn.layers, m.n_layers),
        ffn=settings,
    )


def _required(field: dataclasses.Field) -> bool:
    """A Settings field without a default (fields added later carry one, for older configs)."""
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value
