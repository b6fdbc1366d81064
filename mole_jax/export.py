"""`launch.py export`: a trained MoLE model's routed experts -> lookup tables in tensorstore.

LUT_l[v, e, :] = expert_e(RMSNorm_exp_l(Emb[v])) for every vocabulary row v, computed by the same
`token_tables` code the model trains with, in chunks of rows so memory is bounded by the chunk.
The store is written to a temporary directory next to its destination, read back and checked
against digests of what was written, given its manifest, and only then renamed into place. A
killed export leaves at most a `.<name>.tmp-*` directory, which the next export removes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mole_jax import quant
from mole_jax.checkpoint import Checkpointer
from mole_jax.config import load_config
from mole_jax.errors import StoreError, UserError
from mole_jax.ffn import kind_of_layer
from mole_jax.lut_store import LutStore, layer_name
from mole_jax.model import Transformer

TABLE_BUDGET_BYTES = 256 * 2**20  # float32 table values computed per chunk, all layers together


def check_exportable(cfg, workdir: str) -> None:
    kind = cfg.model.ffn.kind
    if kind != "mole":
        raise UserError(
            f"{workdir} holds a '{kind}' model; only MoLE experts become lookup tables "
            "(a MoE's experts are exported for offloading with `launch.py export --experts`)"
        )
    if cfg.model.ffn.mole.expert_input != "embedding":
        raise UserError(
            f"{workdir}: its experts read the hidden state (model.ffn.mole.expert_input="
            f"'{cfg.model.ffn.mole.expert_input}'), which depends on context, so they cannot "
            "become a lookup table indexed by token id"
        )


def restore_model(workdir: str, step: int | None = None, cfg=None):
    """(cfg, graphdef, params, rest, meta) of a workdir's checkpoint (newest when step is None)."""
    cfg = cfg or load_config(workdir)
    abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    like = {"params": nnx.to_pure_dict(params)}
    ckpt = Checkpointer(workdir)
    try:
        got = ckpt.restore(like, step=step, params_only=True)
    finally:
        ckpt.close()
    if got is None:
        raise UserError(f"{workdir} has no checkpoint; train it first")
    rest = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.to_pure_dict(rest))
    return cfg, graphdef, got[0], rest, got[1]


def chunk_rows(cfg, n_layers: int) -> int:
    m = cfg.model
    per_row = 4 * n_layers * m.ffn.mole.experts * m.d_model
    rows = max(256, TABLE_BUDGET_BYTES // per_row // 256 * 256)
    return min(m.vocab_size, rows)


def export_lut(
    workdir: str,
    step: int | None = None,
    dtype: str = "float16",
    out: str = "lut",
    rows_per_chunk: int = 1,
) -> dict:
    """Writes `<workdir>/<out>/` and returns its manifest."""
    if dtype not in quant.DTYPES:
        raise UserError(f"--dtype={dtype} is not one of {', '.join(quant.DTYPES)}")
    cfg = load_config(workdir)
    check_exportable(cfg, workdir)
    m = cfg.model
    if dtype == "nf4" and (m.d_model % m.ffn.mole.nf4_block or m.ffn.mole.nf4_block % 2):
        block = m.ffn.mole.nf4_block
        raise UserError(f"model.ffn.mole.nf4_block={block} must be even and divide {m.d_model}")
    cfg.model.ffn.mole.impl = "unique"  # the table path; parameters are the same either way
    cfg, graphdef, params, rest, meta = restore_model(workdir, step, cfg)
    layers = [i for i in range(m.n_layers) if kind_of_layer(m, i) == "mole"]
    final = Path(workdir) / out
    tmp = staging_dir(final)
    rows = chunk_rows(cfg, len(layers))
    shape = (m.vocab_size, m.ffn.mole.experts, m.d_model)
    store = LutStore.create(tmp, layers, shape, dtype, m.ffn.mole.nf4_block, rows_per_chunk, rows)
    tables_fn = jax.jit(lambda p, ids: nnx.merge(graphdef, p, rest).token_tables(ids))
    written = {f"{layer_name(i)}/{n}": hashlib.sha256() for i in layers for n in store.arrays[i]}
    for start in range(0, m.vocab_size, rows):
        ids = jnp.arange(start, min(m.vocab_size, start + rows), dtype=jnp.int32)
        tables = {i: np.asarray(t, np.float32) for i, t in tables_fn(params, ids).items()}
        for i, table in tables.items():
            for name, arr in quant.quantize(table, dtype, m.ffn.mole.nf4_block).items():
                written[f"{layer_name(i)}/{name}"].update(np.ascontiguousarray(arr).tobytes())
        store.write_rows(start, tables)
    manifest = store.finalize(
        dict(
            checkpoint_step=int(meta["step"]),
            params_sha256=meta["params_sha256"],
            d_model=m.d_model,
            n_layers=m.n_layers,
        )
    )
    for name, h in written.items():  # what was read back is what was written
        if manifest["arrays"][name]["sha256"] != h.hexdigest():
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"export verification failed for {name}: read-back differs")
    swap_into_place(tmp, final)
    return manifest


def staging_dir(final: Path) -> Path:
    """Where an export to `final` is written first; stale ones from killed exports are removed."""
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final.parent / f".{final.name}.tmp-{os.getpid()}"


def swap_into_place(tmp: Path, final: Path) -> None:
    """Renames a verified store into place, replacing an older one only after it is complete."""
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
