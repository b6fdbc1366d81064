"""`validate(cfg)`: every field of a run's config checked before anything compiles, one
`ConfigError` line naming the first bad one; returns the typed model config. It sits in the
training layer because it asks the FFN kinds and the mesh rules below it."""

from __future__ import annotations

import math

import ml_collections

from mole_jax.errors import require, require_one_of
from mole_jax.model import ffn
from mole_jax.model.config import model_config
from mole_jax.parallel.sharding import batch_ways, mesh_shape


def _positive(cfg: ml_collections.ConfigDict, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = cfg[name]
        require(
            isinstance(value, int) and not isinstance(value, bool) and value > 0,
            f"{prefix}.{name}={value!r} must be a positive integer",
        )


def _check_attention(impl: str, seq_len: int) -> None:
    from mole_jax.model import flash

    require_one_of(impl, flash.IMPLS, "model.attention")
    require(
        impl != "flash" or seq_len % flash.BLOCK == 0,
        f"model.attention=flash needs data.seq_len={seq_len} to be a multiple of {flash.BLOCK} "
        "(the kernels' block); use auto or xla",
    )


def validate(cfg: ml_collections.ConfigDict, n_devices: int | None = None):
    """Raises ConfigError naming the first offending field; returns the typed model config
    (`model_config.ModelConfig`). Runs before anything compiles."""
    m, d, t = cfg.model, cfg.data, cfg.train
    _positive(m, "model", ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"))
    _positive(d, "data", ("seq_len", "vocab_size"))
    _positive(t, "train", ("steps", "batch_size", "microbatches", "eval_batches", "log_every"))
    require(
        m.d_model % m.n_heads == 0,
        f"model.n_heads={m.n_heads} must divide model.d_model={m.d_model}",
    )
    require(
        (m.d_model // m.n_heads) % 2 == 0,
        f"head dim model.d_model/model.n_heads={m.d_model // m.n_heads} must be even for RoPE",
    )
    require_one_of(m.dtype, ("float32", "bfloat16"), "model.dtype")
    require_one_of(m.remat, ("none", "full", "dots"), "model.remat")
    _check_attention(m.get("attention", "auto"), d.seq_len)
    require_one_of(t.token_tables, ("step", "microbatch"), "train.token_tables")
    factor = t.get("diverge_factor", 0)
    require(
        factor == 0 or factor > 1,
        f"train.diverge_factor={factor} must be 0 (off) or above 1 (x the recent median loss)",
    )
    require(
        t.loss_chunk >= 0 and (t.loss_chunk == 0 or d.seq_len % t.loss_chunk == 0),
        f"train.loss_chunk={t.loss_chunk} must be 0 or divide data.seq_len={d.seq_len}",
    )
    require(m.init_std > 0, f"model.init_std={m.init_std} must be > 0")
    require(
        d.seq_len <= m.max_seq_len,
        f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len} (RoPE/KV-cache limit)",
    )
    require(
        d.vocab_size <= m.vocab_size,
        f"data.vocab_size={d.vocab_size} (tokenizer) exceeds model.vocab_size={m.vocab_size}",
    )
    require(0.0 < d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    require_one_of(d.get("format", "auto"), ("auto", "text", "jsonl", "parquet"), "data.format")
    _validate_train(t)
    _validate_mesh(cfg, n_devices)
    mcfg = model_config(cfg)
    _validate_llama_fields(mcfg)
    ffn.KINDS[mcfg.kind].validate(mcfg)
    return mcfg


GATED_KINDS = ("dense", "moe", "mole", "pregated")
ROPE_SCALING = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _validate_llama_fields(m) -> None:
    require(
        m.n_kv_heads >= 0 and m.n_heads % m.kv_heads == 0,
        f"model.n_kv_heads={m.n_kv_heads} must divide model.n_heads={m.n_heads} (0: n_heads)",
    )
    require(
        not m.gated or m.kind in GATED_KINDS,
        f"model.ffn.gated is built for {', '.join(GATED_KINDS)}; a gated '{m.kind}' expert is "
        "not yet",
    )
    if m.rope_scaling:
        kind, _, args = m.rope_scaling.partition(":")
        keys = [a.partition("=")[0] for a in args.split(",")]
        require(
            kind == "llama3" and sorted(keys) == sorted(ROPE_SCALING),
            f"model.rope_scaling={m.rope_scaling!r}: only 'llama3:' with "
            f"{'=…,'.join(ROPE_SCALING)}=… is supported",
        )
        try:
            values = [float(a.partition("=")[2]) for a in args.split(",")]
        except ValueError:
            values = [0.0]
        require(min(values) > 0, f"model.rope_scaling={m.rope_scaling!r}: values must be > 0")


def _validate_train(t: ml_collections.ConfigDict) -> None:
    require(t.lr > 0, f"train.lr={t.lr} must be > 0")
    require(0.0 <= t.min_lr_ratio <= 1.0, f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    require(0.0 <= t.warmup_frac < 1.0, f"train.warmup_frac={t.warmup_frac} must be in [0, 1)")
    require(t.clip > 0, f"train.clip={t.clip} must be > 0")
    require(t.weight_decay >= 0, f"train.weight_decay={t.weight_decay} must be >= 0")
    require(0 <= t.b1 < 1 and 0 <= t.b2 < 1, f"train.b1={t.b1}, train.b2={t.b2} must be in [0, 1)")
    require(t.eval_every >= 0 and t.ckpt_every >= 0, "train.eval_every/ckpt_every must be >= 0")
    require(
        t.profile_at >= 0 and t.profile_steps >= 1,
        f"train.profile_at={t.profile_at} must be >= 0 and train.profile_steps >= 1",
    )
    require(t.keep_ckpts >= 1, f"train.keep_ckpts={t.keep_ckpts} must be >= 1")
    require(
        t.batch_size % t.microbatches == 0,
        f"train.batch_size={t.batch_size} must be divisible by train.microbatches={t.microbatches}",
    )


def planned_devices(mesh_cfg) -> int:
    """The devices `cfg.mesh` asks for when its -1 axis (if any) is 1: what `summary` plans for."""
    return math.prod(max(1, mesh_cfg[a]) for a in ("data", "fsdp", "expert", "tensor"))


def _validate_mesh(cfg: ml_collections.ConfigDict, n_devices: int | None) -> None:
    """The mesh must cover the devices (n_devices, default all of them) and split the batch."""
    if n_devices is None:
        import jax

        n_devices = jax.device_count()
    sizes = mesh_shape(cfg.mesh, n_devices)
    t, ways = cfg.train, batch_ways(sizes)
    micro = t.batch_size // t.microbatches
    require(
        micro % ways == 0,
        f"train.batch_size/train.microbatches={micro} must be divisible by the {ways} devices "
        "that split the batch (mesh.data * mesh.fsdp * mesh.expert)",
    )
