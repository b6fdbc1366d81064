"""The distinct token ids of a batch, on the device (static bound) or on the host (tight bucket).

Axis legend: B batch, L length, U distinct ids (padded). Used by the token tables of kinds whose
output depends only on the token id (MoLE's unique-token training, its LUT in memory or
offloaded): the table holds one row per distinct id and each position gathers its row.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from mole_jax.errors import DataError


def dedup_ids(ids_BxL, vocab_size: int):
    """Distinct ids of a batch padded to a static bound, and each position's row among them.

    Returns (uniq_U, inv_BxL) with uniq_U[inv_BxL] == ids_BxL. U = min(V, B*L): when the batch holds
    at least as many tokens as the vocabulary, the whole vocabulary is the table and inv is the ids.
    Padding rows (id 0) are never referenced, so they receive no gradient.
    """
    n = ids_BxL.size
    if vocab_size <= n:
        return jnp.arange(vocab_size, dtype=ids_BxL.dtype), ids_BxL
    uniq_U, inv = jnp.unique(ids_BxL.ravel(), size=n, fill_value=0, return_inverse=True)
    return uniq_U, inv.reshape(ids_BxL.shape)


def dedup_bucket(n: int, vocab_size: int) -> int:
    """Static table size for n distinct ids: n rounded up to a quarter octave (at most 25%
    padding, so a run compiles for a handful of sizes), capped at the vocabulary."""
    if n >= vocab_size:
        return vocab_size
    step = 2 ** max(0, n.bit_length() - 3)
    return min(vocab_size, -(-n // step) * step)


def host_dedup(ids: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`dedup_ids` on the host, with the table padded only to `dedup_bucket` of the true count.

    Returns (uniq_U, inv) as int32 numpy arrays, uniq_U[inv] == ids. Raises DataError for ids
    outside [0, vocab_size).
    """
    check_ids(ids, vocab_size)
    uniq, inv = unique_inverse(ids)
    size = dedup_bucket(len(uniq), vocab_size)
    if size == vocab_size:
        return np.arange(vocab_size, dtype=np.int32), ids.astype(np.int32)
    uniq_U = np.zeros(size, np.int32)
    uniq_U[: len(uniq)] = uniq
    return uniq_U, inv.reshape(ids.shape).astype(np.int32)


def host_dedup_groups(ids_MxBxL: np.ndarray, vocab_size: int, groups: int, per_micro=False):
    """`host_dedup` per group of the batch's rows: the B rows split evenly into `groups`, each
    group's ids over all M micro-batches deduplicated into its own table. Returns
    (uniq [groups, U], inv [M, B, L]) with uniq[g][inv] == ids for the rows of group g; U is the
    largest group's `dedup_bucket` (the others padded with id 0, never referenced). per_micro:
    one set of tables per micro-batch, uniq [M, groups, U]."""
    if per_micro:
        found = [host_dedup_groups(ids[None], vocab_size, groups) for ids in ids_MxBxL]
        size = max(u.shape[1] for u, _ in found)
        uniq = np.zeros((len(found), groups, size), np.int32)
        for m, (u, _) in enumerate(found):
            uniq[m, :, : u.shape[1]] = u
        return uniq, np.concatenate([inv for _, inv in found])
    check_ids(ids_MxBxL, vocab_size)
    m, b, n = ids_MxBxL.shape
    per = ids_MxBxL.reshape(m, groups, b // groups, n).swapaxes(0, 1)
    found = [unique_inverse(g) for g in per]
    size = max(dedup_bucket(len(u), vocab_size) for u, _ in found)
    if size == vocab_size:
        return np.tile(np.arange(vocab_size, dtype=np.int32), (groups, 1)), ids_MxBxL.astype(
            np.int32
        )
    uniq = np.zeros((groups, size), np.int32)
    inv = np.empty((groups, m, b // groups, n), np.int32)
    for g, (u, i) in enumerate(found):
        uniq[g, : len(u)] = u
        inv[g] = i.reshape(m, b // groups, n)
    return uniq, inv.swapaxes(0, 1).reshape(m, b, n)


def unique_inverse(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`np.unique(ids, return_inverse=True)` over the flattened ids. A decode step holds a
    handful of ids, for which numpy's sort machinery costs more than the work (about 50 us of
    a 2 ms step on this machine), so small inputs go through a dict."""
    flat = np.asarray(ids).ravel()
    if flat.size > 64:
        return np.unique(flat, return_inverse=True)
    values = flat.tolist()
    uniq = sorted(set(values))
    row = {t: i for i, t in enumerate(uniq)}
    return np.array(uniq, flat.dtype), np.array([row[t] for t in values], np.intp)


def check_ids(ids: np.ndarray, vocab_size: int) -> None:
    """Token ids must index the embedding; jnp.take would silently clamp them."""
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise DataError(
            f"token id {hi if hi >= vocab_size else lo} is outside the vocabulary [0, {vocab_size})"
            "; was the data tokenized with another tokenizer?"
        )
