"""Host side of LUT offloading: a bounded row cache in front of a `LutStore`, batched reads of the
rows for a batch's distinct token ids, and a one-slot prefetcher that overlaps the next batch's
reads with the current batch's compute."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses

import numpy as np

from mole_jax.lut_store import LutStore


@dataclasses.dataclass
class RowStats:
    lookups: int = 0  # distinct ids asked for, summed over requests
    hits: int = 0
    rows_read: int = 0  # token rows read from storage
    bytes_read: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class LutRows:
    """Gives every LUT layer's stored rows for a set of token ids.

    Rows come from an LRU cache of `cache_rows` tokens (0 disables it) or, for the misses, from
    one batched read per stored array. A token row is all its layers' values and scales, so
    `bytes_read` grows by `store.row_bytes` for every token read.
    """

    def __init__(self, store: LutStore, cache_rows: int = 4096):
        self.store, self.capacity = store, cache_rows
        self.cache: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self.stats = RowStats()

    def fetch(self, ids: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
        """{layer: {name: rows [len(ids), ...]}} for distinct `ids`, in the order given."""
        ids = [int(i) for i in np.asarray(ids).ravel()]
        self.stats.lookups += len(ids)
        rows = {}
        for t in ids:  # hits first, before any insertion can evict them
            if t in self.cache:
                self.cache.move_to_end(t)
                rows[t] = self.cache[t]
        self.stats.hits += len(rows)
        miss = [t for t in ids if t not in rows]
        if miss:
            read = self.store.read_rows(np.array(miss, np.int64))
            self.stats.rows_read += len(miss)
            self.stats.bytes_read += len(miss) * self.store.row_bytes
            for j, t in enumerate(miss):
                rows[t] = {layer: {n: a[j] for n, a in g.items()} for layer, g in read.items()}
                if self.capacity:
                    self.cache[t] = rows[t]
                    if len(self.cache) > self.capacity:
                        self.cache.popitem(last=False)
        return {
            layer: {name: np.stack([rows[t][layer][name] for t in ids]) for name in group}
            for layer, group in self.store.arrays.items()
        }


def pad_rows(rows: dict, size: int) -> dict:
    """Zero rows appended up to `size` (the static table size of `model.host_dedup`)."""
    return {
        layer: {
            n: np.concatenate([a, np.zeros((size - len(a), *a.shape[1:]), a.dtype)])
            for n, a in g.items()
        }
        for layer, g in rows.items()
    }


class Prefetcher:
    """Runs `fn(item)` for the next item in a background thread while the caller computes."""

    def __init__(self, fn):
        self.fn = fn
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def map(self, items):
        items = iter(items)
        try:
            pending = self.pool.submit(self.fn, next(items))
        except StopIteration:
            return
        for item in items:
            result = pending.result()
            pending = self.pool.submit(self.fn, item)
            yield result
        yield pending.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
