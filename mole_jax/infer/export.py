"""`launch.py export`: a trained model's routed experts -> an offloaded-weight store.

- MoLE (`export_lut`): LUT_l[v, e, :] = expert_e(RMSNorm_exp_l(Emb[v])) for every vocabulary row
  v, computed by the same `token_tables` code the model trains with, in float32 whatever the
  run's compute dtype, in chunks of rows so memory is bounded by the chunk; stored in
  `quant.DTYPES` (`stores/lut.py`).
- MoE (`export_experts`): each layer's expert weights as they are (float dtypes) or group-wise
  quantised (int4/int3/int2), one chunk per expert (`stores/experts.py`), for the
  expert-offloading baseline.

Both write to a folder or to object storage (`--to=URL`: s3://, gs://), through a staging folder
or a fresh data prefix, read back and check against what was written, and publish atomically
(`store.py`). A store records the parameter digest of the checkpoint it came from.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mole_jax.errors import UserError
from mole_jax.files import check_space
from mole_jax.model.config import model_config
from mole_jax.progress import Progress
from mole_jax.stores import quant, store
from mole_jax.stores.experts import ExpertStore, expert_bytes
from mole_jax.stores.lut import LutStore
from mole_jax.train.accounting import lut_block
from mole_jax.train.checkpoint import restore_model
from mole_jax.workdir import as_workdir

TABLE_BUDGET_BYTES = 256 * 2**20  # float32 table values computed per chunk, all layers together


def check_exportable(m, workdir) -> None:
    """MoLE models whose experts read the embedding have a LUT; refuse the others in one line."""
    if m.kind != "mole":
        raise UserError(
            f"{workdir} holds a '{m.kind}' model; only MoLE experts become lookup tables "
            "(a MoE's experts are exported for offloading with `launch.py export --experts`)"
        )
    if m.ffn.expert_input != "embedding":
        raise UserError(
            f"{workdir}: its experts read the hidden state (model.ffn.mole.expert_input="
            f"'{m.ffn.expert_input}'), which depends on context, so they cannot "
            "become a lookup table indexed by token id"
        )


def chunk_rows(m, n_layers: int) -> int:
    per_row = 4 * n_layers * m.ffn.experts * m.d_model
    rows = max(256, TABLE_BUDGET_BYTES // per_row // 256 * 256)
    return min(m.vocab_size, rows)


def export_lut(
    workdir, step: int | None = None, dtype: str = "float16", out: str = "lut",
    rows_per_chunk: int = 1, layout: str | None = None,
) -> dict:  # fmt: skip
    """Writes the store `out` (a name under the workdir, a folder or a URL) and returns its
    manifest (holding the workdir's writer lock). `layout`: layers | packed (default: packed
    for object storage, layers for a folder; `stores/lut.py`)."""
    wd = as_workdir(workdir)
    with wd.writer_lock("export"):
        return _export_lut(wd, step, dtype, out, rows_per_chunk, layout)


def _stage(final, step: int, chosen: bool, total: int, largest: int, what: str):
    """The staging of a store bound for `final`, checked first (not older; disk space and file
    size limit for a folder)."""
    store.check_not_older(final, step, chosen)
    if not final.remote:
        check_space(final.local_path.parent, total, largest, what)
    return store.Staging.begin(final)


def _export_lut(wd, step, dtype, out, rows_per_chunk, layout) -> dict:
    if dtype not in quant.DTYPES:
        raise UserError(f"--dtype={dtype} is not one of {', '.join(quant.DTYPES)}")
    m = model_config(wd.config)
    check_exportable(m, wd)
    block = lut_block(m, dtype)
    if dtype in ("nf4", "nf3") and (m.d_model % block or block % 2 or m.d_model % 8):
        raise UserError(
            f"model.ffn.mole.{dtype}_block={block} must be even and divide d_model={m.d_model}"
            " (a multiple of 8)"
        )
    # The table is computed in float32 whatever the run's compute dtype (as the official MoLE
    # export does), then rounded once to the stored dtype.
    model = restore_model(wd, dataclasses.replace(m, dtype="float32"), "train", step)
    layers = [i for i in range(m.n_layers) if m.kind_of_layer(i) == "mole"]
    rows = chunk_rows(m, len(layers))  # rows per chunk computed and per shard written
    row = quant.row_bytes(dtype, m.d_model, block) * m.ffn.experts
    final = store.location(wd.store(out))
    layout = layout or ("packed" if final.remote else "layers")
    shard = rows * row * (len(layers) if layout == "packed" else 1)
    total = 2 * len(layers) * m.vocab_size * row
    staging = _stage(final, model.step, step is not None, total, shard + 2**16, "the LUT")
    shape = (m.vocab_size, m.ffn.experts, m.d_model)
    lut = LutStore.create(staging, layers, shape, dtype, block, rows_per_chunk, rows, layout)

    @jax.jit
    def tables_fn(p, ids):
        return nnx.merge(model.graphdef, p, model.rest).token_tables(ids, layers)

    with Progress("export", m.vocab_size, 0, "row") as p:
        for start in range(0, m.vocab_size, rows):
            ids = jnp.arange(start, min(m.vocab_size, start + rows), dtype=jnp.int32)
            tables = {i: np.asarray(t, np.float32) for i, t in tables_fn(model.params, ids).items()}
            lut.write_rows(start, tables)
            p.update(len(ids))
        p.phase("verifying and publishing the store")
        manifest = lut.finalize(
            dict(
                checkpoint_step=model.step,
                params_digest=model.params_digest,
                d_model=m.d_model,
                n_layers=m.n_layers,
            )
        )
        staging.publish()
    return dict(manifest, location=str(final))


def export_experts(
    workdir, step: int | None = None, dtype: str = "float32", out: str = "experts"
) -> dict:
    """Writes the store `out` (a name under the workdir, a folder or a URL) from a MoE
    checkpoint; returns its manifest (holding the workdir's writer lock)."""
    wd = as_workdir(workdir)
    with wd.writer_lock("export --experts"):
        return _export_experts(wd, step, dtype, out)


def _export_experts(wd, step, dtype, out) -> dict:
    dtypes = (*quant.FLOAT_DTYPES, *quant.GROUP_DTYPES)
    if dtype not in dtypes:
        raise UserError(f"expert stores hold {'|'.join(dtypes)}, not --dtype={dtype}")
    m = model_config(wd.config)
    if m.kind not in ("moe", "pregated"):
        raise UserError(f"{wd} holds a '{m.kind}' model; only MoE experts are offloaded")
    model = restore_model(wd, m, "train", step)
    layers = [i for i in range(m.n_layers) if m.kind_of_layer(i) == m.kind]
    experts = {i: {n: model.params["blocks"][i]["ffn"][n] for n in ("up", "down")} for i in layers}
    fields = dict(
        checkpoint_step=model.step,
        params_digest=model.params_digest,
        dtype=dtype,
        layers=layers,
        experts=m.ffn.experts,
        d_model=m.d_model,
        d_expert=m.ffn.d_expert,
        gated=m.gated,
        bytes_per_expert=expert_bytes(dtype, m.d_model, m.ffn.d_expert, m.gated),
    )
    if dtype in quant.GROUP_DTYPES:
        bits, g = quant.GROUP_DTYPES[dtype]
        if m.d_model % g or m.ffn.d_expert % g:
            raise UserError(
                f"--dtype={dtype} quantises groups of {g}: d_model={m.d_model} and the expert "
                f"width {m.ffn.d_expert} must both be multiples of {g}"
            )
        fields.update(bits=bits, group=g, method="min-max")
        worst = max(
            float(np.abs(np.asarray(w)).max()) for e in experts.values() for w in e.values()
        )
        if not np.isfinite(worst) or worst > 3e4:
            raise UserError(f"--dtype={dtype} stores float16 scales: expert weights reach {worst}")
    per_layer = m.ffn.experts * fields["bytes_per_expert"]
    final = store.location(wd.store(out))
    staging = _stage(final, model.step, step is not None, 2 * len(layers) * per_layer,
                     per_layer + 2**16, "the expert store")  # fmt: skip
    manifest = ExpertStore.write(staging, experts, dtype, fields)
    staging.publish()
    return dict(manifest, location=str(final))
