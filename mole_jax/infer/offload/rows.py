"""Host side of LUT offloading: a bounded row cache in front of a `LutStore`, batched reads of the
packed rows for a batch's distinct token ids, and a one-slot prefetcher that overlaps the next
batch's reads with the current batch's compute."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses

import numpy as np

from mole_jax.stores.location import io_counters, io_since
from mole_jax.stores.lut import LutStore


@dataclasses.dataclass
class RowStats:
    lookups: int = 0  # distinct ids asked for, summed over requests
    hits: int = 0
    rows_read: int = 0  # token rows read from storage
    bytes_read: int = 0  # rows_read * row_bytes: the rows asked of the store
    io_bytes: int = 0  # measured: bytes storage returned for those reads (tensorstore metrics)
    io_requests: int = 0  # measured: read requests those reads made (a round trip each, remote)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class LutRows:
    """Gives the packed rows (`LutStore.layout`) of a set of token ids.

    Rows come from an LRU cache of `cache_rows` tokens (0 disables it), a preallocated
    [cache_rows, row_bytes] byte slab, or, for the misses, from one batched read per stored
    array (a packed store: one read per token). `bytes_read` grows by `store.row_bytes` (all
    layers, scales included) per token read; `io_bytes` and `io_requests` by what storage really
    served meanwhile, from tensorstore's own counters (shard indexes the first time, nothing for
    rows tensorstore still held; exact while no other thread reads a store).
    """

    def __init__(self, store: LutStore, cache_rows: int = 4096):
        self.store, self.capacity = store, cache_rows
        self.slab = np.empty((cache_rows, store.row_bytes), np.uint8)
        self.reset()

    def reset(self) -> None:
        """Empties the cache and zeroes the counters."""
        self.slot: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.free = list(range(self.capacity))
        self.stats = RowStats()

    def fetch(self, ids: np.ndarray, size: int | None = None) -> np.ndarray:
        """uint8 [size, row_bytes]: the rows of distinct `ids` in order, then zero rows."""
        ids = [int(i) for i in np.asarray(ids).ravel()]
        out = np.zeros((size or len(ids), self.store.row_bytes), np.uint8)
        hit_at, hit_slot, miss_at = [], [], []
        for j, t in enumerate(ids):
            s = self.slot.get(t)
            if s is None:
                miss_at.append(j)
            else:
                self.slot.move_to_end(t)
                hit_at.append(j)
                hit_slot.append(s)
        out[hit_at] = self.slab[hit_slot]
        self.stats.lookups += len(ids)
        self.stats.hits += len(hit_at)
        if miss_at:
            miss = np.array([ids[j] for j in miss_at], np.int64)
            start = io_counters()
            read = self.store.read_packed(miss)
            requests, nbytes = io_since(start)
            self.stats.io_requests += requests
            self.stats.io_bytes += nbytes
            out[miss_at] = read
            self.stats.rows_read += len(miss)
            self.stats.bytes_read += len(miss) * self.store.row_bytes
            self._insert(miss, read)
        return out

    def _insert(self, ids: np.ndarray, rows: np.ndarray) -> None:
        if not self.capacity:
            return
        for t, row in zip(ids[-self.capacity :].tolist(), rows[-self.capacity :], strict=True):
            slot = self.free.pop() if self.free else self.slot.popitem(last=False)[1]
            self.slab[slot] = row
            self.slot[t] = slot


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
