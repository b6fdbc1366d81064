"""What the study files share: their knobs as a locked config, and one run spec per model.

A study's verdicts are its declared `CLAIMS` (`mole_jax/sweeps/claims.py`, tested with
`mole_jax/sweeps/stats.py`); the helpers here only describe rows (means, groups)."""

from __future__ import annotations

import numpy as np
from ml_collections import ConfigDict

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


def by_group(rows: list[dict]) -> dict[str, list[dict]]:
    """Finished rows by their seed group (a run planned with `seeds`), else by their name."""
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r.get("group") or r["name"], []).append(r)
    return out


def mean(rows: list[dict], value=lambda r: r["val_loss"]) -> float:
    """The mean of `value` over rows (a seed group's runs)."""
    return float(np.mean([value(r) for r in rows]))
