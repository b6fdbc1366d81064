"""Fault kinds of experiments/faults.py for stores, divergence and the file system (issue 28).

missing_shard: a shard file of the MoLE's LUT deleted: `eval --offload` is refused in one line
(never zero rows read as weights); exported again, it serves the clean result.

diverge: `train` continued at lr 5-10,000: it stops in one line before checkpointing a blown-up
state (landed: the line says it diverged or went non-finite); every checkpoint still verifies.

export_damaged: the newest checkpoint's parameters damaged, then `export`: refused in one line
without replacing the newest step's LUT with an older step's; `train` retrains the step (on the
curve) and the kept LUT serves it.

read_only: `eval`, `eval --offload`, `export` or `train` on a read-only workdir (its mode; as
root, a read-only bind mount in a private mount namespace): one line naming the path, nothing
changed; writable again, the command succeeds.

Each returns faults.py's outcome dict plus `landed`. The helpers come from the module that
defined `b`'s class (faults, or __main__ when faults.py runs as a script).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from _fault_checks import campaign_module, curve, verified_checkpoints


def _listing(w: Path) -> list:
    return sorted((str(p), p.stat().st_size) for p in w.rglob("*") if p.is_file())


def missing_shard(b, rng, i) -> dict:
    f = campaign_module(b)
    w = b.copy(b.mole, f"shard_{i}")
    clean = f.launch("eval", f"--workdir={w}", "--offload", "--max_tokens=1024")
    shards = sorted(p for p in (w / "lut").rglob("*") if p.is_file() and p.parent.name != "lut"
                    and p.name != "zarr.json")  # fmt: skip
    victim = rng.choice(shards)
    victim.unlink()
    runs = [f.launch("eval", f"--workdir={w}", "--offload", "--max_tokens=1024")]
    honest = runs[0]["rc"] == 2 and f._one_error(runs[0])
    runs += [f.launch("export", f"--workdir={w}", "--dtype=float16"),
             f.launch("eval", f"--workdir={w}", "--offload", "--max_tokens=1024")]  # fmt: skip
    recovered = honest and runs[-1]["rc"] == 0 and runs[-1]["out"] == clean["out"]
    out = f._outcome(runs, recovered, 0 if honest else 1, w, 20)
    return dict(out, landed=not victim.exists() or runs[0]["rc"] == 2, note=victim.name)


def diverge(b, rng, i) -> dict:
    f = campaign_module(b)
    w = b.copy(b.mole, f"diverge_{i}")
    lr = rng.choice([5.0, 50.0, 1e4])
    runs = [f.launch("train", *b.flags("mole", 40), f"--workdir={w}", f"--config.train.lr={lr}")]
    err = runs[0]["err"]
    landed = "diverged" in err or " is nan" in err or " is inf" in err
    steps = sorted(int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit())
    lost = len(set(steps) - verified_checkpoints(w))
    recovered = runs[0]["rc"] == 2 and f._one_error(runs[0]) and 20 in steps
    return dict(f._outcome(runs, recovered, lost, w, 20), landed=landed, note=f"lr={lr:g}")


def export_damaged(b, rng, i) -> dict:
    f = campaign_module(b)
    w = b.copy(b.mole, f"export_damaged_{i}")
    lut = (w / "lut" / "manifest.json").read_text()
    files = [p for p in (w / "checkpoints" / "20" / "params").rglob("*") if p.is_file()]
    how = f._damage(max(files, key=lambda p: p.stat().st_size), rng)
    runs = [f.launch("export", f"--workdir={w}", "--dtype=float16")]
    honest = runs[0]["rc"] == 2 and f._one_error(runs[0]) and "newer than step" in runs[0]["err"]
    kept = (w / "lut" / "manifest.json").read_text() == lut
    runs += [f.launch("train", *b.flags("mole", 20), f"--workdir={w}"),
             f.launch("eval", f"--workdir={w}", "--offload", "--max_tokens=1024")]  # fmt: skip
    recovered = honest and kept and runs[-1]["rc"] == 0 and curve(w) == curve(b.mole)
    out = f._outcome(runs, recovered, 0 if kept else 1, w, 15)
    return dict(out, landed=runs[0]["rc"] != 0 or "corrupt" in runs[0]["out"], note=how)


def _read_only_cmd(w: Path) -> list[str] | None:
    """The prefix that runs a command with `w` read-only (None: chmod did it, or impossible)."""
    if os.geteuid() != 0:
        for p in [w, *w.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        return []
    if not shutil.which("unshare") or subprocess.run(["unshare", "-m", "true"]).returncode:
        return None
    mount = f'mount --bind {w} {w} && mount -o remount,bind,ro {w} && exec "$@"'
    return ["unshare", "-m", "sh", "-c", mount, "sh"]


def read_only(b, rng, i) -> dict:
    f = campaign_module(b)
    w = b.copy(b.mole, f"read_only_{i}")
    args = rng.choice([["eval", "--max_tokens=1024"], ["eval", "--offload", "--max_tokens=1024"],
                       ["export", "--dtype=float16"], ["train", *b.flags("mole", 40)]])  # fmt: skip
    prefix, before = _read_only_cmd(w), _listing(w)
    if prefix is None:
        return dict(recovered=False, lost=0, tracebacks=0, landed=False, note="cannot make it")
    landed = subprocess.run([*prefix, "touch", str(w / "probe")]).returncode != 0
    cmd = [*prefix, sys.executable, str(f.ROOT / "launch.py"), *args, f"--workdir={w}"]
    p = subprocess.run(cmd, cwd=f.ROOT, capture_output=True, text=True, timeout=600)
    first = dict(rc=p.returncode, out=p.stdout, err=p.stderr, traceback="Traceback" in p.stderr)
    honest = p.returncode == 2 and f._one_error(first) and str(w) in p.stderr
    unchanged = _listing(w) == before
    for q in [w, *w.rglob("*")]:
        q.chmod(q.stat().st_mode | 0o200)
    runs = [first, f.launch(*args, f"--workdir={w}")]
    recovered = honest and runs[-1]["rc"] == 0
    out = f._outcome(runs, recovered, 0 if unchanged else 1, w, 20)
    return dict(out, landed=landed, note=args[0] + " --offload" * ("--offload" in args))
