"""mole_jax's command line: `python launch.py COMMAND [flags]`; `python launch.py --help` lists
the commands and `python launch.py COMMAND --help` one command's flags and config fields.

    python launch.py train    --config=configs/mole.py:size=tiny,experts=4 --workdir=runs/m
    python launch.py summary  --config=configs/mole.py:size=160m,experts=16
    python launch.py export   --workdir=runs/m [--dtype=float16|bfloat16|float32|int8|nf4|nf3]
    python launch.py eval     --workdir=runs/m [--offload] [--tasks=mole_offline]
    python launch.py generate --workdir=runs/m --prompt="..." [--offload]
    python launch.py sweep    --config=experiments/<study>.py[:arg] --workdir=runs/<study>
    python launch.py convert  --from=runs/dense --workdir=runs/pg --config=configs/pregated.py:...

Everything is a function in `mole_jax` (the commands are `mole_jax/cli/commands.py`); user
mistakes end with one `error:` line on stderr and exit status 2.
"""

from mole_jax.cli.main import cli

if __name__ == "__main__":
    cli()
