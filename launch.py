"""mole_jax command line: train | summary | export | eval | generate | sweep | convert.

    python launch.py train    --config=configs/mole.py:size=tiny,experts=4 --workdir=runs/m
                              [--coordinator=HOST:PORT --num_processes=N --process_id=I]
    python launch.py summary  --config=configs/mole.py:size=160m,experts=16 [--json=FILE]
    python launch.py export   --workdir=runs/m [--dtype=float16|bfloat16|float32|int8|nf4]
    python launch.py export   --workdir=runs/moe --experts [--dtype=float16|...|int4|int3|int2]
    python launch.py eval     --workdir=runs/m [--offload] [--data=<corpus or files:glob>]
    python launch.py eval     --workdir=runs/m --tasks=mole_offline [--offload] [--limit=N]
                              [--num_fewshot=K] [--include_path=DIR] [--allow_hub]
    python launch.py generate --workdir=runs/m --prompt="..." [--offload]
    python launch.py sweep    --config=experiments/<study>.py[:arg] --workdir=runs/<study>
                              [--parallel=N] [--dry_run] [--executor=slurm --slurm=partition=p,...]
    python launch.py convert  --from=runs/dense --workdir=runs/pg \
                              --config=configs/pregated.py:size=tiny,convert=1[,permanent=1]

Everything is a function in `mole_jax`; this file parses flags and dispatches. User mistakes end
with one line on stderr and exit status 2.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mole_jax.cli import commands
from mole_jax.errors import UserError
from mole_jax.train.preempt import Preempted

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)

config_flags.DEFINE_config_file("config", None, "Config file and argument: path.py:arg.")
flags.DEFINE_string("workdir", None, "Run directory (config.json, metrics, checkpoints, lut/).")
flags.DEFINE_string("json", None, "summary/bench: also write the result to this JSON file.")
flags.DEFINE_integer("step", None, "export/eval/generate: checkpoint step (default: newest).")
flags.DEFINE_string(
    "dtype",
    "float16",
    "export: float32|float16|bfloat16|int8|nf4|nf3 (LUT); experts: floats|int4|int3|int2.",
)
flags.DEFINE_bool("experts", False, "export: a MoE model's experts (offload baseline), not a LUT.")
flags.DEFINE_bool(
    "offload", False, "eval/generate: read LUT rows (MoLE) or experts (MoE) from their store."
)
flags.DEFINE_string("data", None, "eval: corpus name or files:<glob> (default: the run's corpus).")
flags.DEFINE_integer(
    "max_tokens", None, "eval: at most this many tokens (default: the whole split)."
)
flags.DEFINE_string("prompt", "", "generate: the prompt text.")
flags.DEFINE_integer("max_new", 64, "generate: tokens to sample.")
flags.DEFINE_float("temperature", 0.0, "generate: 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "generate: sample among the k most likely (0: all).")
flags.DEFINE_integer("seed", 0, "generate: sampling seed.")
flags.DEFINE_integer("parallel", 1, "sweep: runs at a time.")
flags.DEFINE_bool("dry_run", False, "sweep: print the runs without starting them.")
flags.DEFINE_enum(
    "executor", "local", ["local", "slurm", "submitit_local"],
    "sweep: run here (local), as a SLURM job array, or through submitit's local executor.",
)  # fmt: skip
flags.DEFINE_list("slurm", [], "sweep --executor=slurm: key=value submitit/SLURM parameters.")
flags.DEFINE_string("coordinator", None, "train on several hosts: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "train on several hosts: how many processes.")
flags.DEFINE_integer("process_id", None, "train on several hosts: this process's index.")
flags.DEFINE_list(
    "tasks", None, "eval: lm-eval tasks to score (e.g. mole_offline) instead of loss."
)
flags.DEFINE_integer("limit", None, "eval --tasks: at most this many documents per task.")
flags.DEFINE_integer("num_fewshot", None, "eval --tasks: examples in each prompt (default 0).")
flags.DEFINE_string("include_path", None, "eval --tasks: a folder of your own lm-eval task YAMLs.")
flags.DEFINE_bool("allow_hub", False, "eval --tasks: allow tasks whose data is on the HF hub.")
flags.DEFINE_string("from", None, "convert: the trained dense workdir to convert.")
FLAGS = flags.FLAGS

COMMANDS = ("train", "summary", "export", "eval", "generate", "sweep", "convert")


def fail(message: str, code: int = 2):
    """One line on stderr and the exit status: how every user mistake ends."""
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def _terminated(signum, frame):
    raise KeyboardInterrupt("terminated")  # SIGTERM unwinds like Ctrl-C: finally clauses run


def main(argv):
    signal.signal(signal.SIGTERM, _terminated)  # (training installs its own: preempt.py)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # orbax logs every save, and its own recoveries
    if len(argv) != 2 or argv[1] not in COMMANDS:
        fail(f"error: usage: launch.py {{{'|'.join(COMMANDS)}}} [flags]; got {argv[1:]}")
    try:
        result = getattr(commands, argv[1])(FLAGS)
    except UserError as e:
        fail(f"error: {e}")
    except Preempted as e:
        fail(f"{e}: checkpoint saved; run the same command again to resume", e.exit_code)
    except KeyboardInterrupt as e:
        fail("interrupted", 143 if str(e) == "terminated" else 130)
    except Exception as e:  # noqa: BLE001 - a full disk surfaces through many libraries
        if not disk_full(e):
            raise
        fail(f"error: the disk is full ({disk_full(e)}); free some space and run the command "
             "again: what was completely written is kept, the rest is not trusted")  # fmt: skip
    if result is not None and FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)


def disk_full(e: BaseException) -> str | None:
    """What a full disk (or a file size limit) said, if that is what `e`, or an exception it
    was raised from, reports: orbax, tensorstore and numpy wrap the OSError differently."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            return f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        text = str(e)
        for code in DISK_FULL:
            if os.strerror(code) in text:
                return os.strerror(code)
        e = e.__cause__ or e.__context__
    return None


def parse_flags(argv):
    """absl's parse, with every mistake in a flag (a wrong type, an unknown field or a bad
    `--config` argument) reported in one line and exit status 2 instead of a FATAL (status 1)."""
    try:
        rest = FLAGS(argv)
        if FLAGS["config"].present:
            FLAGS.config.get  # noqa: B018 - config_flags raises a failed load only when it is read
        return rest
    except OSError as e:  # a `--config=` file that does not exist or cannot be read
        fail(f"error: {str(e).splitlines()[0]} ({str(e).splitlines()[-1].strip()})")
    except UserError as e:  # a bad `--config=file.py:arg`
        fail(f"error: {e}")
    except flags.Error as e:
        fail(f"error: {e}")
    except SyntaxError as e:  # a config or study file that does not parse
        fail(f"error: {e.filename}:{e.lineno}: {e.msg}")
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        # ml_collections rejects an override of a field the config does not have (locked config)
        # or of the wrong type while absl parses `--config.a.b=v`.
        name = str(e).strip("'\"")
        bad = [a for a in argv if a.startswith("--config.") and name in a.split("=")[0]]
        what = bad[0].split("=")[0] if bad else f"--config override ({type(e).__name__}: {e})"
        fail(
            f"error: {what}: no such config field, or a value of the wrong type; "
            "see the config file for the fields"
        )


def cli():
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
