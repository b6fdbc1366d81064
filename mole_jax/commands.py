"""The subcommands of launch.py, one function each, taking the parsed absl flags."""

from __future__ import annotations

from mole_jax.errors import UserError


def _need(flag_values, *names: str) -> None:
    for name in names:
        if getattr(flag_values, name) in (None, ""):
            raise UserError(f"--{name} is required for this command")


def train(f):
    from mole_jax import train as train_lib

    _need(f, "config", "workdir")
    out = train_lib.run(f.config, f.workdir)
    print(
        f"trained to step {out['step']}: loss {out['loss']:.4f}, val_loss {out['val_loss']:.4f}, "
        f"{out['tokens_per_s']:.0f} tokens/s; logs in {f.workdir}/metrics.jsonl and {f.workdir}/tb"
    )
    return out


def summary(f):
    from mole_jax import accounting
    from mole_jax.config import validate

    _need(f, "config")
    validate(f.config, n_devices=1)
    s = accounting.summarize(f.config)
    print(accounting.format_summary(s))
    return s


def _not_yet(name: str):
    def command(f):
        raise UserError(f"`{name}` is not available in this version of mole_jax")

    return command


export = _not_yet("export")
eval = _not_yet("eval")  # noqa: A001 - the subcommand's name
generate = _not_yet("generate")
sweep = _not_yet("sweep")
