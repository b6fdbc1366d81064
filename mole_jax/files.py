"""Files that are never seen half written: the text goes to a temporary file beside the target,
which is renamed over it (atomic on POSIX). The temporary name carries the process id, so two
processes writing the same file (parallel sweep runs) never share one."""

from __future__ import annotations

import os
import shutil


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):  # a full disk: leave the old file, and no half-written one
            os.remove(tmp)
        raise


def check_space(directory: str | os.PathLike, total: int, largest: int, what: str) -> None:
    """Refuses, in one line, to start writing `what` (`total` bytes, no file above `largest`)
    where the disk's free space or the process's file size limit cannot take it, so a write
    never fails half way (a failed write inside orbax or tensorstore is noisy and leaves
    temporary directories behind)."""
    import resource

    from mole_jax.errors import UserError

    directory = os.fspath(directory)
    probe = directory
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    free = shutil.disk_usage(probe).free
    if total > free:
        raise UserError(
            f"the disk is full: {what} needs {total / 2**20:.1f} MiB under {directory}, "
            f"{free / 2**20:.1f} MiB are free; free some space and run the command again"
        )
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and largest > limit:
        raise UserError(
            f"the file size limit ({limit:,} bytes, ulimit -f) is below what {what} writes "
            f"(up to {largest:,} bytes in one file); raise it and run the command again"
        )
