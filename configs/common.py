"""The fields every run shares; each `configs/<kind>.py` starts from `base(size)` and adds its kind.

Kind-specific fields live only under `model.ffn.<kind>`. Optional fields are placeholders so the
command line can set them (`--config.data.tokenizer=path/tokenizer.json`).
"""

from ml_collections import ConfigDict, config_dict

from mole_jax.config import CPU_SIZES, SIZES


def base(size: str) -> ConfigDict:
    s = SIZES[size]
    c = ConfigDict()
    c.seed = 0
    c.model = _model(s, size)
    c.model.ffn = ConfigDict(dict(kind="dense", layers="all", gated=False))  # gated: SwiGLU
    c.data = _data(s)
    # Device mesh (parallel/sharding.py): sizes of its axes; one may be -1 (the remaining
    # devices). The paper sizes shard their state over every device (FSDP): replicated on 64
    # H100s the 1b models' AdamW state alone would not fit (`launch.py compile`).
    fsdp = size not in CPU_SIZES
    c.mesh = ConfigDict(dict(data=1 if fsdp else -1, fsdp=-1 if fsdp else 1, expert=1, tensor=1))
    c.train = _train(s, size)
    return c


def _model(s: dict, size: str) -> ConfigDict:
    return ConfigDict(
        dict(
            vocab_size=s["vocab_size"],  # embedding rows; >= the tokenizer's vocabulary
            d_model=s["d_model"],
            n_layers=s["n_layers"],
            n_heads=s["n_heads"],
            d_ff=s["d_ff"],
            max_seq_len=max(1024, s["seq_len"]),  # RoPE / KV-cache limit
            rope_theta=10_000.0,
            # Fidelity defaults (each follows the official MoLE code, i.e. Megatron, unless noted):
            init_std=0.01,  # paper: normal(0, 0.01)
            scaled_out_init=True,  # official code: output projections std init_std/sqrt(2L)
            norm_eps=1e-5,  # official code (Megatron's default); mole_jax used 1e-6 before
            activation="gelu",  # exact (erf) GELU, non-gated FFNs, as in the MoLE paper
            # compute: float32 | bfloat16 (params, softmax and loss stay fp32)
            dtype="float32" if size in CPU_SIZES else "bfloat16",
            remat="none" if size in CPU_SIZES else "full",  # none | full | dots
            # identical blocks as one lax.scan: one block compiled. On for the paper sizes, whose
            # scanned steps fit and compile in minutes for 64 H100s / v5p:4x4x4 (docs/scaling.md,
            # "Compiling for the hardware"); off on the CPU sizes, where the scan compiled
            # slower (docs/scaling.md, "Scanned layers").
            scan_layers=size not in CPU_SIZES,
            # training's attention: auto = a flash kernel (Pallas: splash on TPU, Triton on GPU)
            # on accelerators when seq_len is a multiple of 128, XLA's otherwise | xla | flash
            attention="auto",
            # Llama-family fields (`launch.py import` sets them from config.json): key/value
            # heads (0: n_heads), an LM head tied to the embedding, Llama 3.1's RoPE rescaling
            n_kv_heads=0,
            tie_embeddings=False,
            rope_scaling="",  # "" | "llama3:factor=8,low_freq_factor=1,high_freq_factor=4,..."
        )
    )


def _data(s: dict) -> ConfigDict:
    return ConfigDict(
        dict(
            # shakespeare | linux-doc | pydoc | files:<glob> | hf:<name> | megatron:<prefix>
            corpus="shakespeare",
            format="auto",  # files: auto (by suffix) | text (a document per file) | jsonl | parquet
            tokenizer=config_dict.placeholder(str),  # a tokenizer.json; default: train a BPE
            vocab_size=8192,  # BPE vocabulary when training one
            seq_len=s["seq_len"],
            val_fraction=0.05,  # share of documents held out for validation
            cache_dir=config_dict.placeholder(str),  # default: $MOLE_JAX_CACHE or ~/.cache/mole_jax
        )
    )


def _train(s: dict, size: str) -> ConfigDict:
    local = size in CPU_SIZES
    return ConfigDict(
        dict(
            steps=s["steps"],
            batch_size=s["batch_size"],  # sequences per optimiser step (global)
            microbatches=1,  # gradient accumulation: the step is split into this many parts
            # positions whose logits exist at once in the loss (0: the whole sequence)
            loss_chunk=0 if size in CPU_SIZES else 512,
            # MoLE's token tables: once per step (shared by its micro-batches) or per micro-batch
            token_tables="step" if size in CPU_SIZES else "microbatch",
            lr=s["lr"],
            warmup_frac=0.05 if local else 0.01,
            min_lr_ratio=0.1,  # cosine floor as a fraction of lr
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            clip=1.0,
            diverge_factor=3.0,  # stop at a loss over 3x its recent median (0: only NaN/inf)
            eval_every=100 if local else 1000,
            eval_batches=8 if local else 64,
            log_every=1 if local else 10,
            ckpt_every=100 if local else 1000,
            keep_ckpts=3,
            async_ckpt=True,
            profile_at=0,  # trace steps profile_at+1 .. +profile_steps into W/profile (0: off)
            profile_steps=5,
            progress=True,  # tqdm bar on a TTY
        )
    )
