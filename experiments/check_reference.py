"""Imports model directories written by the reference code and compares with its own output.

    python tests/fixtures/hf/make_fixtures.py --mole_repo=MoLE --out=/tmp/ref --seed=7  # torch
    python experiments/check_reference.py --dir=/tmp/ref                                # here

Each `<dir>/<name>/` holds a checkpoint the reference code saved from random weights and its
`reference.npz` (logits of a fixed batch, a greedy continuation and, for MoLE, the table of
`reparameterize.py`). Each is imported with `launch.py import` (a fresh process, as a user
would), its LUT exported with `launch.py export --dtype=float32`, and compared: the largest
absolute logit difference, whether the greedy tokens are identical, the largest LUT difference.
Writes experiments/results/interop/reference_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mole_jax.infer.engine import build_engine  # noqa: E402
from mole_jax.infer.generate import generate  # noqa: E402
from mole_jax.model.config import model_config  # noqa: E402
from mole_jax.stores.lut import LutStore  # noqa: E402
from mole_jax.train.checkpoint import restore_model  # noqa: E402
from mole_jax.workdir import Workdir  # noqa: E402

OUT = ROOT / "experiments" / "results" / "interop" / "reference_check.json"


def launch(*args: str) -> None:
    cmd = [sys.executable, str(ROOT / "launch.py"), *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(args)} failed: {out.stderr[-2000:]}")


def check(src: Path, w: str) -> dict:
    launch("import", f"--from={src}", f"--workdir={w}")
    ref = np.load(src / "reference.npz")
    m = model_config(Workdir(w).config)
    r = restore_model(w, m)
    logits = nnx.merge(r.graphdef, r.params, r.rest)(jnp.asarray(ref["ids"], jnp.int32))
    row = dict(
        name=src.name, kind=m.kind, d_model=m.d_model, n_layers=m.n_layers,
        vocab_size=m.vocab_size,
        logits_max_abs=float(np.abs(np.asarray(logits.logits_BxLxV) - ref["logits"]).max()),
        logits_scale=float(np.abs(ref["logits"]).max()),
    )  # fmt: skip
    got = generate(build_engine(w, "experts"), ref["prompt"], max_new=len(ref["greedy"]))
    row["greedy_equal"] = bool(np.array_equal(got["tokens"][0], ref["greedy"]))
    if "table" in ref:
        launch("export", f"--workdir={w}", "--dtype=float32")
        store = LutStore.open(Path(w, "lut"))
        rows = store.read_rows(np.arange(m.vocab_size, dtype=np.int32))
        table = ref["table"].reshape(m.vocab_size, m.n_layers, m.ffn.experts, m.d_model)
        row["lut_max_abs"] = max(
            float(np.abs(rows[layer]["values"] - table[:, i]).max())
            for i, layer in enumerate(sorted(rows))
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="make_fixtures.py --out's folder")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted(p for p in Path(args.dir).iterdir() if (p / "reference.npz").exists()):
            rows.append(check(src, os.path.join(tmp, src.name)))
            print(json.dumps(rows[-1]))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    record = dict(
        command=f"python experiments/check_reference.py --dir={args.dir}",
        made_by="python tests/fixtures/hf/make_fixtures.py --mole_repo=MoLE --out=DIR --seed=7",
        rows=rows,
    )
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"{'name':<12}{'logits max abs':>16}{'greedy':>8}{'LUT max abs':>14}")
    for r in rows:
        lut = f"{r['lut_max_abs']:.2e}" if "lut_max_abs" in r else "-"
        print(f"{r['name']:<12}{r['logits_max_abs']:>16.2e}{str(r['greedy_equal']):>8}{lut:>14}")


if __name__ == "__main__":
    main()
