"""metrics.jsonl + TensorBoard event files, and the reduction of per-layer aux stats to scalars."""

from __future__ import annotations

import json
import math
import os
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
    dropped, so the curve continues as if the run had never been interrupted.
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
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if row.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        write_text_atomic(self.path, "".join(keep))

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


def _plain(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (int, str, bool)) or v is None:
        return v
    return float(v)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
