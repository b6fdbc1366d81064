"""What the study files share: their knobs as a locked config, and one run spec per model."""

from __future__ import annotations

import numpy as np
from ml_collections import ConfigDict
from scipy import stats

from mole_jax.config import parse_arg


def knobs(arg: str | None, **defaults) -> ConfigDict:
    """The study's knobs from `key=value,...` (typed after the defaults), overridable by flags.
    Every study also takes `tasks` (lm-eval tasks joined by '/', e.g. `tasks=mole_offline`):
    each run is then scored on them after training, the papers' metric beside the loss."""
    c = ConfigDict(vars(parse_arg(arg, {"tasks": "", **defaults})))
    c.lock()
    return c


def run(name: str, kind: str, c: ConfigDict, evals=(), **args) -> dict:
    """A run of `configs/<kind>.py` at the study's size, trained for the study's steps."""
    arg = ",".join([f"size={c.size}"] + [f"{k}={v}" for k, v in args.items()])
    r = dict(name=name, config=f"configs/{kind}.py:{arg}", set={"train.steps": c.steps},
             evals=list(evals))  # fmt: skip
    if c.get("tasks"):
        r["tasks"] = str(c.tasks).split("/")
    return r


def val(rows: list[dict]) -> dict[str, float]:
    """Each finished run's validation loss by name."""
    return {r["name"]: r["val_loss"] for r in rows}


def verdict(ok: bool) -> str:
    return "holds" if ok else "does NOT hold"


def by_group(rows: list[dict]) -> dict[str, list[dict]]:
    """Finished rows by their seed group (a run planned with `seeds`), else by their name."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r.get("group") or r["name"], []).append(r)
    return out


def _welch(va: np.ndarray, vb: np.ndarray) -> tuple[float, float, float]:
    """(mean difference, its standard error, the two-sided 95 % critical value of Welch's t)."""
    sa, sb = va.var(ddof=1) / len(va), vb.var(ddof=1) / len(vb)
    se = float(np.sqrt(sa + sb))
    df = (sa + sb) ** 2 / (sa**2 / (len(va) - 1) + sb**2 / (len(vb) - 1)) if se > 0 else np.inf
    return float(va.mean() - vb.mean()), se, float(stats.t.ppf(0.975, df))


def _groups(rows, a, b, value):
    g = by_group(rows)
    return (np.asarray([value(r) for r in g[k]], np.float64) for k in (a, b))


def difference(rows: list[dict], a: str, b: str, value=lambda r: r["val_loss"]) -> str:
    """'a - b = d ± se: outside / inside the spread': d the difference of the groups' means, se
    its standard error from the groups' sample stds; inside when |d| is within Welch's t test's
    95 % critical value times se. With one seed on a side the spread is unknown, and the line
    says so."""
    va, vb = _groups(rows, a, b, value)
    d = va.mean() - vb.mean()
    if min(len(va), len(vb)) < 2:
        return f"{a} - {b} = {d:+.4f} (one seed: spread unknown)"
    d, se, crit = _welch(va, vb)
    where = "outside" if abs(d) > crit * se else "inside"
    return f"{a} - {b} = {d:+.4f} ± {se:.4f} ({len(va)} vs {len(vb)} seeds): {where} the spread"


def mean(rows: list[dict], value=lambda r: r["val_loss"]) -> float:
    """The mean of `value` over rows (a seed group's runs)."""
    return float(np.mean([value(r) for r in rows]))


def claim(rows: list[dict], lower: str, higher: str, value=lambda r: r["val_loss"]) -> str:
    """The verdict on a paper's claim that group `lower` scores below group `higher`:
    'reproduced' (below, outside the spread of `difference`), 'not reproduced' (above, outside
    it), 'inside the spread' otherwise; with the difference line it rests on. No verdict with one
    seed on a side or a value that is not finite (a diverged run)."""
    va, vb = _groups(rows, lower, higher, value)
    d = difference(rows, lower, higher, value)
    if min(len(va), len(vb)) < 2 or not np.isfinite(np.concatenate([va, vb])).all():
        return f"no verdict ({d})"
    gap, se, crit = _welch(va, vb)
    if abs(gap) <= crit * se:
        return f"inside the spread ({d})"
    return f"{'reproduced' if gap < 0 else 'not reproduced'} ({d})"


def trend(points: list[tuple[float, dict]], what: str) -> str:
    """The least-squares slope of validation loss per doubling of `what` over (x, row) pairs —
    every run, seeds included — with its standard error and a two-sided 95 % t test (df = runs -
    2): one test of a whole "more `what` helps" trend."""
    x = np.log2([float(v) for v, _ in points])
    y = np.array([r["val_loss"] for _, r in points])
    if len(x) < 3 or len(set(x)) < 2:
        return f"- slope per doubling of {what}: too few runs"
    b, a = np.polyfit(x, y, 1)
    se = np.sqrt(np.sum((y - a - b * x) ** 2) / (len(x) - 2) / np.sum((x - x.mean()) ** 2))
    crit = stats.t.ppf(0.975, len(x) - 2)
    word = "reproduced" if b + crit * se < 0 else ("not reproduced" if b - crit * se > 0 else
                                                   "inside the spread")  # fmt: skip
    return (
        f"- loss per doubling of {what} (claim: falls): {word} (slope {b:+.4f} ± {se:.4f} over "
        f"{len(x)} runs, 95 % bound {crit * se:.4f})"
    )
