"""Files that are never seen half written: the text goes to a temporary file beside the target,
which is renamed over it (atomic on POSIX). The temporary name carries the process id, so two
processes writing the same file (parallel sweep runs) never share one."""

from __future__ import annotations

import os


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
