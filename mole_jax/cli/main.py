"""`launch.py`'s body: parse the flags (every mistake in one line, exit 2), print help, run one
subcommand of `commands`, and turn what can go wrong at run time into one line and an exit
status: a user's mistake 2, a preempted run 143 (or the signal's), Ctrl-C 130, a full disk 2."""

from __future__ import annotations

import errno
import json
import keyword
import os
import signal
import sys

from absl import app, flags, logging

from mole_jax import platforms, progress
from mole_jax.cli.flags import FLAGS
from mole_jax.cli.help import COMMANDS, HELP
from mole_jax.cli.help import show as show_help
from mole_jax.errors import UserError
from mole_jax.train.preempt import Preempted

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def fail(message: str, code: int = 2):
    """One line on stderr and the exit status: how every user mistake ends."""
    print(message, file=sys.stderr, flush=True)
    sys.exit(code)


def _terminated(signum, frame):
    raise KeyboardInterrupt("terminated")  # SIGTERM unwinds like Ctrl-C: finally clauses run


def main(argv):
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # orbax logs every save, and its own recoveries
    if len(argv) != 2 or argv[1] not in COMMANDS:
        fail(f"error: usage: launch.py {{{'|'.join(COMMANDS)}}} [flags]; got {argv[1:]} "
             "(launch.py --help lists the commands)")  # fmt: skip
    progress.enable()
    # Imported after parsing (--help and flag mistakes need no jax), and under the default
    # SIGTERM: a kill while jax loads ends the process quietly, before anything is written (an
    # interrupt raised inside an import's finalizers would be printed and swallowed instead).
    from mole_jax.cli import commands

    signal.signal(signal.SIGTERM, _terminated)  # (training installs its own: preempt.py)
    try:
        result = getattr(commands, argv[1] + "_" * keyword.iskeyword(argv[1]))(FLAGS)
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
    if sys.argv[1:2] == ["compile"]:  # the target's compiler, with the CPU as the only backend
        from mole_jax.parallel.targets import compile_env

        compile_env()
    platforms.default_to_cpu()  # before the first jax import (in `commands`)
    if any(a in HELP for a in sys.argv[1:]):
        try:
            sys.exit(show_help(sys.argv, parse_flags))
        except BrokenPipeError:  # `launch.py train --help | head`
            os._exit(0)
    sys.argv = _workdir_config(sys.argv)
    app.run(main, flags_parser=parse_flags)


def _workdir_config(argv: list) -> list:
    """`--config.a.b=v` overrides without a `--config=` vary the `--workdir`'s own config
    (configs/workdir.py)."""
    args = [a for a in argv[1:] if isinstance(a, str)]
    given = any(a.startswith("--config=") for a in args)
    workdir = [a.partition("=")[2] for a in args if a.startswith("--workdir=")]
    if given or not workdir or not any(a.startswith("--config.") for a in args):
        return argv
    from mole_jax.cli.help import ROOT

    return [argv[0], f"--config={ROOT / 'configs' / 'workdir.py'}:{workdir[-1]}", *argv[1:]]
