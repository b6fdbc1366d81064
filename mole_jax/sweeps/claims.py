"""A study's declared claims, tested on its finished rows (`mole_jax/sweeps/stats.py` does the
statistics): the verdict lines a sweep writes before the study's own, exploratory, report.

Metrics: `val_loss` (or any numeric row key; lower is better), `eval:<name>` (an eval's loss,
lower is better), `task:<engine>/<task>/<metric>` (an lm-eval score, higher is better)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time

import numpy as np

from mole_jax.errors import ConfigError
from mole_jax.files import write_text_atomic
from mole_jax.sweeps import stats
from mole_jax.sweeps.stats import Claim, Trend

__all__ = ["Claim", "Trend", "verdicts", "describe"]


def _groups(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows by seed group: a run planned with `seeds` has its `group`; a run a study seeded by
    hand, `<name>-s<i>` beside its seed-0 run `<name>` (isoflop), joins `<name>`'s group."""
    names = {r["name"] for r in rows}
    out: dict[str, list[dict]] = {}
    for r in rows:
        base = re.sub(r"-s\d+$", "", r["name"])
        out.setdefault(r.get("group") or (base if base in names else r["name"]), []).append(r)
    return out


def _seed(row: dict) -> int:
    return int(row.get("set", {}).get("seed", 0))


def higher_is_better(metric: str) -> bool:
    return metric.startswith("task:")


def _scored(row: dict, metric: str) -> tuple[dict, str, str]:
    """(the engine's record, task, metric name) of a `task:<engine>/<task>/<metric>` metric."""
    engine, task, name = metric.removeprefix("task:").split("/")
    return row.get("tasks", {}).get(engine, {}), task, name


def value(row: dict, metric: str) -> float:
    """The metric's value in a finished row (NaN where the row lacks it)."""
    if metric.startswith("task:"):
        record, task, name = _scored(row, metric)
        return float(record.get("tasks", {}).get(task, {}).get(name, np.nan))
    if metric.startswith("eval:"):
        return float(row.get("evals", {}).get(metric[5:], {}).get("loss", np.nan))
    return float(row.get(metric, np.nan))


def _stderr(row: dict, metric: str) -> float:
    """An lm-eval score's item-level standard error in a row (0 for other metrics)."""
    if not metric.startswith("task:"):
        return 0.0
    record, task, name = _scored(row, metric)
    return float(record.get("tasks", {}).get(task, {}).get(f"{name}_stderr", 0.0))


def _items(rows: list[dict], metric: str):
    """[seeds, items] of per-item 0/1 results where every row saved them, else None."""
    got = []
    for r in rows:
        record, task, _ = _scored(r, metric)
        got.append(record.get("items", {}).get(task))
    return None if any(g is None for g in got) else np.asarray(got, np.float64)


def _by_seed(rows: list[dict], metric: str) -> dict[int, float]:
    return {_seed(r): value(r, metric) for r in rows}


def check_claim(c: Claim, groups: dict[str, list[dict]], m: int):
    """(Result, 'n' text) of one claim, in the claim's direction (> 0 supports it)."""
    a, b = groups[c.better], groups[c.worse]
    if higher_is_better(c.metric):
        ia, ib = _items(a, c.metric), _items(b, c.metric)
        if ia is not None and ib is not None and ia.shape[1] == ib.shape[1]:
            r = stats.bootstrap_items(ia, ib, m)
            return r, f"{len(a)} vs {len(b)} seeds × {ia.shape[1]} items"
    sa, sb = _by_seed(a, c.metric), _by_seed(b, c.metric)
    sign = 1.0 if higher_is_better(c.metric) else -1.0
    extra = sum(np.mean([_stderr(r, c.metric) ** 2 for r in g]) for g in (a, b))
    note = " + item error, unpaired bound" if extra > 0 else ""
    if sorted(sa) == sorted(sb) and len(sa) > 1:
        diffs = sign * np.array([sa[s] - sb[s] for s in sorted(sa)])
        r = stats.one_sample(diffs, "paired t over seeds" + note, m, extra)
        return r, f"{len(sa)} shared seeds"
    r = stats.welch(sign * np.array(list(sa.values())), sign * np.array(list(sb.values())), m,
                    extra)  # fmt: skip
    r = dataclasses.replace(r, test=r.test + note)
    return r, f"{len(sa)} vs {len(sb)} seeds, not paired"


def check_trend(t: Trend, groups: dict[str, list[dict]], m: int):
    """The slope of the metric per doubling of x, in the claim's direction: per seed where every
    seed ran every point (a one-sample t over the seeds' slopes), else over all runs (df n - 2)."""
    sign = 1.0 if higher_is_better(t.metric) else -1.0
    per = {g: _by_seed(groups[g], t.metric) for g, _ in t.points}
    x = np.log2([float(v) for _, v in t.points])
    seeds = set.intersection(*(set(s) for s in per.values()))
    if len(seeds) > 1 and all(len(s) == len(seeds) for s in per.values()):
        slopes = [np.polyfit(x, [per[g][s] for g, _ in t.points], 1)[0] for s in sorted(seeds)]
        return stats.one_sample(sign * np.array(slopes), "paired slopes over seeds", m), (
            f"{len(seeds)} seeds × {len(x)} points"
        )
    xs = np.array([xi for xi, (g, _) in zip(x, t.points, strict=True) for _ in per[g]])
    ys = sign * np.array([v for g, _ in t.points for v in per[g].values()])
    b, a0 = np.polyfit(xs, ys, 1)
    df = len(xs) - 2
    se = np.sqrt(np.sum((ys - a0 - b * xs) ** 2) / df / np.sum((xs - xs.mean()) ** 2)) if df else 0
    return stats.from_se(float(b), float(se), df, "least-squares slope over runs", m), (
        f"{len(xs)} runs"
    )


def verdicts(rows: list[dict], claims) -> list[str]:
    """One line per declared claim, Holm-corrected over the study's claims."""
    groups = _groups(rows)
    m = len(claims)
    tested = []
    for c in claims:
        fn = check_trend if isinstance(c, Trend) else check_claim
        tested.append(fn(c, groups, m))
    adjusted = stats.holm([r.p for r, _ in tested])
    return [
        stats.line(c.label, r, p, n) + (f" [{c.source}]" if c.source else "")
        for c, (r, n), p in zip(claims, tested, adjusted, strict=True)
    ]


def describe(claims) -> list[dict]:
    """The claims as data (sweep.json, the run spec)."""
    return [dict(type=type(c).__name__, label=c.label, **_fields(c)) for c in claims]


def _fields(c) -> dict:
    return {k: (list(map(list, v)) if k == "points" else v)
            for k, v in dataclasses.asdict(c).items()}  # fmt: skip


def study_claims(module, study_cfg=None, groups=None) -> list:
    """The study file's CLAIMS: a list of Claim / Trend ([] when it declares none), or a
    function of the study's config returning one (claims that follow its knobs, e.g. the
    expert counts swept; the study's defaults where no config is given). Checked against the
    sweep's run groups where given: a claim naming no run is a ConfigError."""
    got = getattr(module, "CLAIMS", None) or []
    if callable(got):
        got = got(module.get_config() if study_cfg is None else study_cfg)
    got = list(got)
    for c in got:
        if not isinstance(c, (Claim, Trend)):
            raise ConfigError(f"the study's CLAIMS hold {c!r}: each must be a Claim or a Trend")
        names = [c.better, c.worse] if isinstance(c, Claim) else [g for g, _ in c.points]
        missing = [n for n in names if groups is not None and n not in groups]
        if missing or (isinstance(c, Trend) and len(names) < 2):
            raise ConfigError(f"claim '{c.label}': no run or seed group named "
                              f"{', '.join(missing) or 'two points'} in the sweep")  # fmt: skip
    return got


def declare(workdir: str, claims, finished: int) -> dict:
    """Records the claims in <workdir>/claims.json before any run starts; a claim changed after
    runs finished is recorded as such (`declared_after_runs`), so its verdicts say post hoc."""
    path, now = os.path.join(workdir, "claims.json"), describe(claims)
    old = json.load(open(path)) if os.path.exists(path) else None
    if old is not None and old.get("claims") == now:
        return old
    out = dict(claims=now, declared=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               declared_after_runs=finished)  # fmt: skip
    os.makedirs(workdir, exist_ok=True)
    write_text_atomic(path, json.dumps(out, indent=2))
    return out


def section(rows: list[dict], claims, declared: dict, exploratory: str) -> str:
    """The report: the declared claims' verdicts, then the study's own reading as exploratory."""
    when = declared.get("declared_after_runs", 0)
    head = "Declared claims" + (
        f" (declared after {when} run(s) had finished: post hoc, confirm by a re-run)"
        if when else " (declared before the runs)"
    ) + ", Holm-corrected over the study:"  # fmt: skip
    out = [head] + [f"- {v}" for v in verdicts(rows, claims)] if claims else []
    if exploratory:
        out += [""] * bool(out) + ["Exploratory (not declared before the runs):", exploratory]
    return "\n".join(out)
