"""`launch.py`'s body: parse the flags (every mistake in one line, exit 2), print help, run one
subcommand of `commands`, and turn what can go wrong at run time into one line and an exit
status: a user's mistake 2, a preempted run 143 (or the signal's), Ctrl-C 130, a full disk 2."""

from __future__ import annotations

import errno
import json
import keyword
import logging as std_logging
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


def _not_orbax_task(record) -> bool:
    """Drops asyncio's report of an orbax write task whose failure the command reports."""
    text = record.getMessage()
    return not (text.startswith("Task exception was never retrieved") and "/orbax/" in text)


def fail(message: str, code: int = 2, now: bool = False):
    """One line on stderr and the exit status: how every user mistake ends. `now`: without the
    exit handlers (after a full disk, they would flush logs, TensorBoard's, to it)."""
    print(message, file=sys.stderr, flush=True)
    if now:
        sys.stdout.flush()
        os._exit(code)
    sys.exit(code)


def _terminated(signum, frame):
    raise KeyboardInterrupt("terminated")  # SIGTERM unwinds like Ctrl-C: finally clauses run


def main(argv):
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.ERROR)  # orbax logs every save, and its own recoveries
        # ... and each failure of a save in each of its threads, with tracebacks (a full disk:
        # hundreds of lines), before raising it to the command, which reports it in one line
        logging.get_absl_logger().addFilter(lambda r: "/orbax/" not in r.pathname)
        std_logging.getLogger("asyncio").addFilter(_not_orbax_task)
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
        if full := disk_full(e):
            fail(
                f"error: the disk is full ({full}); free some space and run the command "
                "again: what was completely written is kept, the rest is not trusted",
                now=True,
            )
        if denied := access_denied(e):
            fail(f"error: {denied}")
        from mole_jax.parallel import distributed

        if lost := distributed.collective_failure(e):
            fail(f"error: {lost}")
        raise
    if result is not None and FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)


def _os_error(e: BaseException, codes: tuple) -> tuple[int, str] | None:
    """(errno, what it said) of the first error in `e`'s chain that reports one of `codes`:
    orbax, tensorstore and numpy wrap the OSError differently (some only in their text)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in codes:
            return e.errno, f"{e.strerror}: {e.filename}" if e.filename else e.strerror
        for code in codes:
            if os.strerror(code) in str(e):
                return code, os.strerror(code)
        e = e.__cause__ or e.__context__
    return None


def disk_full(e: BaseException) -> str | None:
    """What a full disk (or a file size limit) said, if that is what `e` reports."""
    got = _os_error(e, DISK_FULL)
    return got and got[1]


ACCESS = {  # an operator's mistake about where a command may write: errno -> what to do
    errno.EROFS: "use a --workdir on a writable file system (or copy the workdir to one)",
    errno.EACCES: "no permission: check the owner and mode of that path",
    errno.EPERM: "not permitted: check the owner and mode of that path",
    errno.ENOTDIR: "a path component is a file, not a directory: pass a directory",
    errno.EISDIR: "that path is a directory where a file is expected",
}


def access_denied(e: BaseException) -> str | None:
    """One line for a write or read the file system refused (read-only, permissions, a file
    where a directory goes), naming the path and what to do."""
    got = _os_error(e, tuple(ACCESS))
    if got is None and isinstance(e, FileExistsError):
        return f"{e.filename} exists and is not a directory: pass a directory"
    return got and f"{got[1]}; {ACCESS[got[0]]}"


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
