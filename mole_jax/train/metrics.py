"""metrics.jsonl + TensorBoard event files, and the reduction of per-layer aux stats to scalars."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from typing import Any

import numpy as np

from mole_jax.files import write_text_atomic


def aux_stats(per_layer: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Layer-mean of each scalar stat (aux_loss excluded) and per-layer lists of vector stats."""
    scalars: dict[str, list] = {}
    out: dict[str, Any] = {}
    for i, aux in sorted(per_layer.items()):
        for k, v in aux.items():
            if k == "aux_loss":
                continue
            v = np.asarray(v)
            if v.ndim == 0:
                scalars.setdefault(k, []).append(float(v))
            else:
                out[f"{k}/l{i}"] = [round(float(x), 6) for x in v.ravel()]
    out.update({k: float(np.mean(v)) for k, v in scalars.items()})
    return out


class MetricsWriter:
    """Appends one JSON object per line to `metrics.jsonl` and scalars to `tb/`.

    On resume at step s, rows logged after s (by a run that died before its next checkpoint) are
    dropped, so the curve continues as if the run had never been interrupted. A damaged file is
    said in one warning line: rows that cannot be read (a flipped or non-UTF-8 byte) are dropped
    and the file as found is kept as `metrics.jsonl.damaged-N`; steps up to s left without a
    row (a truncated file, a lost block) are named.
    """

    def __init__(self, workdir: str, resume_step: int = 0):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._truncate_after(resume_step)
        self.f = open(self.path, "a")
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=10)

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            raw = f.read()
        rows, bad = _scan(raw)
        keep = [(row, line) for row, line in rows if row["step"] <= step]
        # Rows after the checkpoint go anyway, and a last row cut short (by a kill or a full
        # disk) comes after it: neither is damage to report.
        bad = [(n, s) for n, s, cut in bad if (s <= step if s is not None else step and not cut)]
        # Where the log has steps: the training rows kept, and the unreadable rows' own steps.
        steps = {row["step"] for row, _ in keep if "loss" in row}
        steps |= {s for _, s in bad if s is not None}
        gaps = _gaps(sorted(steps), step)
        aside = _keep_aside(self.path) if bad else None
        write_text_atomic(self.path, "".join(line.decode() + "\n" for _, line in keep))
        if bad or gaps:
            print(_warning(self.path, bad, gaps, aside), flush=True)

    def write(self, step: int, row: dict[str, Any]) -> None:
        row = {"step": int(step), **{k: _plain(v) for k, v in row.items()}}
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, float) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.f.close()
        self.tb.close()


def losses_up_to(workdir: str, step: int, n: int) -> list[float]:
    """The last `n` training losses logged at or before `step` (what a resumed run's divergence
    test starts from); unreadable rows are left out without a word (the writer reports them)."""
    try:
        with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
            rows, _ = _scan(f.read())
    except OSError:
        return []
    losses = [r["loss"] for r, _ in rows if r["step"] <= step and isinstance(r.get("loss"), float)]
    return losses[-n:]


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (int, str, bool)) or v is None:
        return v
    return float(v)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows of `workdir`/metrics.jsonl; rows that cannot be read are skipped, in one warning
    line (a last row still being written, or cut by a kill, silently)."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, "rb") as f:
        rows, bad = _scan(f.read())
    bad = [(n, s) for n, s, cut in bad if not cut]
    if bad:
        print(_warning(path, bad, [], None, "skipped"), flush=True)
    return [row for row, _ in rows]


_STEP = re.compile(rb'^\{"step": (\d+)[,}]')


def _scan(raw: bytes) -> tuple[list[tuple[dict, bytes]], list[tuple[int, int | None, bool]]]:
    """The rows of a metrics.jsonl, each with its line, and the lines that are not a row:
    (line number, the step it still names or None, whether it is a last line cut short)."""
    lines = raw.split(b"\n")
    rows, bad = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = _row(line)
        if row is not None:
            rows.append((row, line))
            continue
        m = _STEP.match(line)
        bad.append((n, int(m.group(1)) if m else None, n == len(lines)))
    return rows, bad


def _row(line: bytes) -> dict | None:
    try:
        row = json.loads(line.decode())
    except (UnicodeDecodeError, ValueError):
        return None
    ok = isinstance(row, dict) and type(row.get("step")) is int and row["step"] >= 0
    return row if ok else None


def _gaps(steps: list[int], last: int) -> list[tuple[int, int]]:
    """The step ranges up to `last` with no row where the rows' own spacing says there should be
    one. The spacing is the widest one seen twice between rows (counted from step 0): the row at
    the end of a shorter run only adds narrower ones, and a change of `log_every` is seen twice
    once the run has logged twice since. A row is due `every` steps after the last one, up to
    `last` (the checkpoint: every row up to it was written before it was saved)."""
    if last <= 0:
        return []
    if not steps:
        return [(1, last)]
    pairs = list(zip([0, *steps[:-1]], steps, strict=True))
    diffs = [b - a for a, b in pairs]
    every = max([d for d in set(diffs) if diffs.count(d) > 1] or diffs)
    gaps = [(a + 1, b - 1) for a, b in pairs if b - a > every]
    if last - steps[-1] >= every:
        gaps.append((steps[-1] + 1, last))
    return gaps


def _keep_aside(path: str) -> str:
    """Keeps the file as found beside it (a hard link: no copy, so a full disk cannot fail it)."""
    n = 1
    while os.path.exists(f"{path}.damaged-{n}"):
        n += 1
    aside = f"{path}.damaged-{n}"
    try:
        os.link(path, aside)
    except OSError:  # a file system without hard links
        shutil.copyfile(path, aside)
    return aside


def _warning(path: str, bad: list, gaps: list, aside: str | None, verb: str = "dropped") -> str:
    """One line: the unreadable rows (line, and step where it can still be read), the steps
    without a row, and where the file as found is kept."""
    parts = []
    if bad:
        where = [f"line {n}" + (f" (step {s})" if s is not None else "") for n, s in bad]
        more = f" and {len(where) - 5} more" if len(where) > 5 else ""
        rows = "row" if len(bad) == 1 else "rows"
        parts.append(f"{verb} {len(bad)} unreadable {rows}: {', '.join(where[:5])}{more}")
    if gaps:
        spans = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in gaps)
        parts.append(f"no rows for steps {spans}: the curve has a gap there")
    if aside:
        parts.append(f"the file as found is kept as {aside}")
    return f"warning: {path}: " + "; ".join(parts)
