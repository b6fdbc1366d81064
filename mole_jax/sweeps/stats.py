"""The statistics of the studies' verdicts: one place, so every verdict is tested the same way.

A study declares its claims before it runs (`Claim`, `Trend` in its file: the paper's direction,
the groups, the metric); `claims.verdicts(rows, claims)` tests each on the finished runs and
words it:

- **paired** where the two groups share seeds (same seed: same initialisation and data order),
  a t test on the per-seed differences; **Welch** otherwise (and the line says which);
- **accuracies** scored on the same items: a paired bootstrap over items and seeds where the
  per-item results were saved; else the seed test with each run's item-level standard error
  added (the conservative, unpaired bound; the line says so);
- **Holm** correction over the study's claims; every line carries the effect in the claim's
  direction, its 95 % interval, p (raw and corrected) and the minimum detectable effect at
  80 % power for that design (at the strictest Holm level, alpha / m);
- the words: *reproduced* (expected sign, significant after correction), *contradicted*
  (opposite sign, significant), *not resolved at this scale* (with the minimum detectable
  effect). A null result is never agreement.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

ALPHA, POWER = 0.05, 0.80


@dataclasses.dataclass(frozen=True)
class Claim:
    """The paper says group `better` beats group `worse` on `metric`: a row key (`val_loss`,
    lower is better) or `task:<engine>/<task>/<metric>` (an lm-eval score, higher is better)."""

    better: str
    worse: str
    metric: str = "val_loss"
    source: str = ""  # where the paper says it, e.g. "MoLE Table 4"

    @property
    def label(self) -> str:
        return f"{self.better} better than {self.worse} ({_metric_name(self.metric)})"


@dataclasses.dataclass(frozen=True)
class Trend:
    """The paper says the metric improves as `x` grows: groups -> x; the test is on the slope
    of the metric per doubling of x (per seed, paired, where every seed ran every x)."""

    points: tuple[tuple[str, float], ...]
    what: str
    metric: str = "val_loss"
    source: str = ""

    @property
    def label(self) -> str:
        return f"{_metric_name(self.metric)} improves per doubling of {self.what}"


@dataclasses.dataclass(frozen=True)
class Result:
    """One test: `effect` in the claim's direction (> 0 supports it), its 95 % interval, p,
    the design's minimum detectable effect at 80 % power, and how it was tested."""

    effect: float
    lo: float
    hi: float
    p: float
    mde: float
    test: str


def _metric_name(metric: str) -> str:
    return metric.removeprefix("task:")


def one_sample(diffs: np.ndarray, test: str, m: int = 1, extra_var: float = 0.0) -> Result:
    """A one-sample t test of mean(diffs) = 0 (df = n - 1); `extra_var` adds a variance to the
    mean's (item-level error; Welch-Satterthwaite degrees of freedom)."""
    n = len(diffs)
    mean = float(diffs.mean())
    var = float(diffs.var(ddof=1)) / n if n > 1 else 0.0
    return from_se(mean, math.sqrt(var + extra_var), _satterthwaite(var, n - 1, extra_var), test, m)


def _satterthwaite(var: float, df: float, known_var: float) -> float:
    """Degrees of freedom of an estimated variance (`var` on `df`) plus a known one (the items'
    error, as good as known over hundreds of items): Welch-Satterthwaite with infinite df for
    the known part; `df` itself when nothing is added."""
    if known_var <= 0 or df <= 0:
        return df
    return (var + known_var) ** 2 / (var**2 / df) if var > 0 else 1e9


def from_se(effect: float, se: float, df: float, test: str, m: int) -> Result:
    if not (se > 0 and df > 0):
        nan = float("nan")
        return Result(effect, nan, nan, nan, nan, test)
    t975 = stats.t.ppf(1 - ALPHA / 2, df)
    p = float(2 * stats.t.sf(abs(effect) / se, df))
    return Result(effect, effect - t975 * se, effect + t975 * se, p, mde(se, df, m), test)


def mde(se: float, df: float, m: int = 1) -> float:
    """The smallest true effect a two-sided t test at level ALPHA / m detects with POWER:
    (t_{1 - alpha/2m} + t_{power}) * se, the usual normal-theory approximation."""
    return float((stats.t.ppf(1 - ALPHA / (2 * m), df) + stats.t.ppf(POWER, df)) * se)


def paired(a: np.ndarray, b: np.ndarray, m: int = 1) -> Result:
    """mean(a - b) over pairs (one per seed), a paired t test."""
    return one_sample(np.asarray(a, np.float64) - np.asarray(b, np.float64), "paired t", m)


def welch(a: np.ndarray, b: np.ndarray, m: int = 1, extra_var: float = 0.0) -> Result:
    """mean(a) - mean(b), Welch's t test (Welch-Satterthwaite degrees of freedom); `extra_var`
    adds a variance to the difference's (item-level error)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if min(len(a), len(b)) < 2:
        return from_se(float(a.mean() - b.mean()), 0.0, 0, "Welch t", m)
    sa, sb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (sa + sb) ** 2 / (sa**2 / (len(a) - 1) + sb**2 / (len(b) - 1)) if sa + sb > 0 else 0
    df = _satterthwaite(sa + sb, df, extra_var)
    se = math.sqrt(sa + sb + extra_var)
    return from_se(float(a.mean() - b.mean()), se, df, "Welch t", m)


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (monotone, capped at 1; NaN stays NaN)."""
    p = np.asarray(pvalues, np.float64)
    out = np.full(len(p), np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[i]))
        out[i] = running
    return out.tolist()


def bootstrap_items(a: np.ndarray, b: np.ndarray, m: int = 1, n_boot: int = 4000, seed: int = 0):
    """Accuracy of a minus that of b, both [seeds, items] of 0/1 on the same items (rows of a
    and b share seeds when paired): resamples items (the same for both, paired) and seeds; the
    95 % percentile interval, a two-sided p from the resampled sign, and the MDE from the
    bootstrap standard error (normal quantiles)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rng = np.random.default_rng(seed)
    items = rng.integers(0, a.shape[1], (n_boot, a.shape[1]))
    sa = rng.integers(0, a.shape[0], (n_boot, a.shape[0]))
    sb = rng.integers(0, b.shape[0], (n_boot, b.shape[0]))
    # row means over resampled items, then the mean over resampled seeds
    ma = np.stack([a[:, it].mean(1) for it in items])  # [boot, seeds]
    mb = np.stack([b[:, it].mean(1) for it in items])
    d = np.take_along_axis(ma, sa, 1).mean(1) - np.take_along_axis(mb, sb, 1).mean(1)
    effect = float(a.mean() - b.mean())
    lo, hi = np.quantile(d, [ALPHA / 2, 1 - ALPHA / 2])
    p = float(min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))
    se = float(d.std(ddof=1))
    z = stats.norm.ppf(1 - ALPHA / (2 * m)) + stats.norm.ppf(POWER)
    return Result(effect, float(lo), float(hi), p, float(z * se), "paired bootstrap over items")


def word(r: Result, p_adjusted: float) -> str:
    if not np.isfinite(p_adjusted) or p_adjusted >= ALPHA:
        return "not resolved at this scale"
    return "reproduced" if r.effect > 0 else "contradicted"


def line(label: str, r: Result, p_adjusted: float, n: str) -> str:
    """'label: WORD — effect +x (95 % CI [lo, hi]), p = ..., Holm p = ..., MDE ... (test, n)'."""
    if not np.isfinite(r.p):
        return f"{label}: no verdict — effect {r.effect:+.4f}, spread unknown ({r.test}, {n})"
    return (
        f"{label}: {word(r, p_adjusted)} — effect {r.effect:+.4f} "
        f"(95 % CI [{r.lo:+.4f}, {r.hi:+.4f}]), p = {r.p:.3f}, Holm p = {p_adjusted:.3f}, "
        f"MDE {r.mde:.4f} at 80 % power ({r.test}, {n})"
    )
