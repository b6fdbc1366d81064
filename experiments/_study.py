"""What the study files share: their knobs as a locked config, and one run spec per model."""

from __future__ import annotations

from ml_collections import ConfigDict

from mole_jax.config import parse_arg


def knobs(arg: str | None, **defaults) -> ConfigDict:
    """The study's knobs from `key=value,...` (typed after the defaults), overridable by flags."""
    c = ConfigDict(vars(parse_arg(arg, defaults)))
    c.lock()
    return c


def run(name: str, kind: str, c: ConfigDict, evals=(), **args) -> dict:
    """A run of `configs/<kind>.py` at the study's size, trained for the study's steps."""
    arg = ",".join([f"size={c.size}"] + [f"{k}={v}" for k, v in args.items()])
    return dict(
        name=name,
        config=f"configs/{kind}.py:{arg}",
        set={"train.steps": c.steps},
        evals=list(evals),
    )


def val(rows: list[dict]) -> dict[str, float]:
    """Each finished run's validation loss by name."""
    return {r["name"]: r["val_loss"] for r in rows}


def verdict(ok: bool) -> str:
    return "holds" if ok else "does NOT hold"
