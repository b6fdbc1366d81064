"""mole_jax command line: train | summary | export | eval | generate | sweep.

    python launch.py train    --config=configs/mole.py:size=tiny,experts=4 --workdir=runs/m
                              [--coordinator=HOST:PORT --num_processes=N --process_id=I]
    python launch.py summary  --config=configs/mole.py:size=160m,experts=16 [--json=FILE]
    python launch.py export   --workdir=runs/m [--dtype=float16|bfloat16|float32|int8|nf4]
    python launch.py export   --workdir=runs/moe --experts [--dtype=float32|float16|bfloat16]
    python launch.py eval     --workdir=runs/m [--offload] [--data=<corpus or files:glob>]
    python launch.py generate --workdir=runs/m --prompt="..." [--offload]
    python launch.py sweep    --config=experiments/<study>.py[:arg] --workdir=runs/<study>
                              [--parallel=N] [--dry_run]

Everything is a function in `mole_jax`; this file parses flags and dispatches. User mistakes end
with one line on stderr and exit status 2.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mole_jax import commands
from mole_jax.errors import UserError

config_flags.DEFINE_config_file("config", None, "Config file and argument: path.py:arg.")
flags.DEFINE_string("workdir", None, "Run directory (config.json, metrics, checkpoints, lut/).")
flags.DEFINE_string("json", None, "summary/bench: also write the result to this JSON file.")
flags.DEFINE_integer("step", None, "export/eval/generate: checkpoint step (default: newest).")
flags.DEFINE_string("dtype", "float16", "export: LUT dtype float32|float16|bfloat16|int8|nf4.")
flags.DEFINE_bool("experts", False, "export: a MoE model's experts (offload baseline), not a LUT.")
flags.DEFINE_bool("offload", False, "eval/generate: read LUT rows from the tensorstore store.")
flags.DEFINE_string("data", None, "eval: corpus name or files:<glob> (default: the run's corpus).")
flags.DEFINE_string("prompt", "", "generate: the prompt text.")
flags.DEFINE_integer("max_new", 64, "generate: tokens to sample.")
flags.DEFINE_float("temperature", 0.0, "generate: 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "generate: sample among the k most likely (0: all).")
flags.DEFINE_integer("seed", 0, "generate: sampling seed.")
flags.DEFINE_integer("parallel", 1, "sweep: runs at a time.")
flags.DEFINE_bool("dry_run", False, "sweep: print the runs without starting them.")
flags.DEFINE_string("coordinator", None, "train on several hosts: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "train on several hosts: how many processes.")
flags.DEFINE_integer("process_id", None, "train on several hosts: this process's index.")
FLAGS = flags.FLAGS

COMMANDS = ("train", "summary", "export", "eval", "generate", "sweep")


_started = False


def main(argv):
    global _started
    _started = True
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"usage: launch.py {{{'|'.join(COMMANDS)}}} [flags]; got {argv[1:]}")
    try:
        result = getattr(commands, argv[1])(FLAGS)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if result is not None and FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)


def cli():
    try:
        app.run(main)
    except UserError as e:  # raised while flags were parsed (a bad --config argument)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        if _started:
            raise
        # ml_collections rejects an override of a field the config does not have (locked config)
        # or of the wrong type while absl parses `--config.a.b=v`.
        name = str(e).strip("'\"")
        bad = [a for a in sys.argv if a.startswith("--config.") and name in a.split("=")[0]]
        what = bad[0].split("=")[0] if bad else f"--config override ({type(e).__name__}: {e})"
        print(
            f"error: {what}: no such config field, or a value of the wrong type; "
            "see the config file for the fields",
            file=sys.stderr,
        )
        sys.exit(2)


if __name__ == "__main__":
    cli()
