"""The declared claims of `serving_seeds.py` and their tests, without flags (the docs' renderers
import this; the benchmark's module defines absl flags)."""

from __future__ import annotations

import numpy as np

from mole_jax.sweeps import stats

# (metric, offered load, cost model): FIFO - expert-aware, > 0 supports the paper.
METRICS = ("unique_experts", "mean_ms", "p95_ms")
CLAIMS = [(m, load, "exact") for m in METRICS for load in ("3", "inf")]
EXPLORATORY = [(m, load, "padded") for m in ("mean_ms", "p95_ms") for load in ("3", "inf")]
SOURCE = "Read-ME Table 4"


def tests(rows: list[dict], claims: list[tuple]) -> list[dict]:
    """Each claim's paired test over the seeds, Holm-corrected within `claims`."""
    out = []
    for metric, load, cost in claims:
        by = {(r["seed"], r["batching"]): r[metric] for r in rows
              if r["load"] == load and r["cost"] == cost}  # fmt: skip
        seeds = sorted({s for s, _ in by})
        fifo = np.array([by[(s, "decode_first")] for s in seeds])
        aware = np.array([by[(s, "expert_aware")] for s in seeds])
        res = stats.paired(fifo, aware, m=len(claims))
        out.append(dict(metric=metric, load=load, cost=cost, seeds=len(seeds), **vars(res)))
    for t, p in zip(out, stats.holm([t["p"] for t in out]), strict=True):
        t["p_holm"] = p
    return out


def verdict_line(t: dict) -> str:
    label = f"expert-aware below FIFO on {t['metric']}, load {t['load']} ({t['cost']} cost)"
    res = stats.Result(*(t[k] for k in ("effect", "lo", "hi", "p", "mde", "test")))
    return stats.line(label, res, t["p_holm"], f"{t['seeds']} queues paired by seed")
