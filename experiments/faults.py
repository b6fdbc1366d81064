"""Fault campaign: does any fault lose an artefact, leave a traceback, or stop a run for good?

Question: under kills, corrupted and truncated files, a full disk, two writers at once and bad
input, does mole_jax keep every artefact that was complete before the fault, print no
traceback, and finish the job when the command is run again? Expected: 0 artefacts lost, 0
tracebacks, every recoverable run recovered (and its training curve equal to an uninterrupted
run's), every bad input refused in one `error:` line with exit status 2.

    python experiments/faults.py [--n=5] [--seed=0] [--kinds=kill_train,...] [--json=...]

Method: tiny MoLE and MoE runs (20 steps, checkpoints every 5, the MoLE's LUT and the MoE's
experts exported) are built once from a generated corpus; each fault copies one, injects the
fault at a random point (seeded) through real `launch.py` processes, then checks: artefacts
complete before the fault still verify (checkpoints restore with their digests, stores open
with their checksums); the command run again succeeds and, for training, continues on the
uninterrupted curve; no stderr holds a traceback. `disk_full` runs the command under a file
size limit (RLIMIT_FSIZE, with SIGXFSZ ignored, so writes fail with EFBIG as on a full disk).
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _paths  # noqa: F401
import numpy as np
from _fault_checks import curve, store_ok, verified_checkpoints
from _fault_inputs import invalid_inputs
from _faults_files import damage_checksums, damage_metrics
from _faults_more import diverge, export_damaged, missing_shard, read_only
from _faults_multihost import sigterm_multihost
from _tables.guide import faults_table
from absl import app, flags, logging

ROOT = Path(__file__).resolve().parent.parent
flags.DEFINE_integer("n", 5, "Faults injected per kind.")
flags.DEFINE_integer("seed", 0, "Seeds the fault points.")
flags.DEFINE_list("kinds", [], "Only these kinds (default: all).")
flags.DEFINE_string("json", "experiments/results/faults.json", "Write the table here.")
FLAGS = flags.FLAGS

WORDS = "the a noble gentle king queen lord lady knight crown sword castle river night".split()


def launch(*args, kill_after=None, sig=signal.SIGKILL, fsize=None, timeout=600) -> dict:
    """A `launch.py` process (its own session): its status, output and whether stderr holds a
    traceback. kill_after: seconds after which `sig` goes to its process group (None: run to the
    end). fsize: a file size limit (SIGXFSZ ignored: writes fail with EFBIG, as on a full disk),
    set by a small exec wrapper (no fork of this multithreaded process running Python)."""
    cmd = [sys.executable, str(ROOT / "launch.py"), *args]
    if fsize is not None:
        setup = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
                 f" resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}));"
                 " os.execv(sys.executable, sys.argv[1:])")  # fmt: skip
        cmd = [sys.executable, "-c", setup, *cmd]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    killed = False
    try:
        out, err = proc.communicate(timeout=kill_after or timeout)
    except subprocess.TimeoutExpired:
        killed = proc.poll() is None  # the signal lands on a running process
        os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=timeout)
    return dict(rc=proc.returncode, out=out, err=err, traceback="Traceback" in err, killed=killed)


class Base:
    """The runs every fault starts from, built once."""

    def __init__(self, root: Path):
        self.root = root
        corpus = root / "corpus"
        corpus.mkdir()
        rng = np.random.default_rng(0)
        for i in range(12):
            idx = rng.integers(0, len(WORDS), (400, 8))
            (corpus / f"doc{i:02d}.txt").write_text("\n".join(" ".join(WORDS[j] for j in r) + "."
                                                              for r in idx))  # fmt: skip
        self.common = [
            f"--config.data.corpus=files:{corpus}/*.txt",
            f"--config.data.cache_dir={root / 'cache'}",
            "--config.data.vocab_size=512", "--config.model.vocab_size=512",
            "--config.data.seq_len=32", "--config.data.val_fraction=0.2",
            "--config.train.batch_size=8", "--config.train.eval_batches=2",
            "--config.train.eval_every=10", "--config.train.ckpt_every=5",
            "--config.train.async_ckpt=False",
        ]  # fmt: skip
        self.mole = self.train("mole", "configs/mole.py:size=tiny,experts=2", 20)
        self.must(launch("export", f"--workdir={self.mole}", "--dtype=float16"))

    @functools.cached_property
    def moe(self) -> Path:
        w = self.train("moe", "configs/moe.py:size=tiny,experts=4,topk=2", 20)
        self.must(launch("export", f"--workdir={w}", "--experts", "--dtype=float32"))
        return w

    @functools.cached_property
    def curve(self) -> dict[int, float]:
        """The uninterrupted curve to step 40 (the MoLE run continued from step 20)."""
        ref = self.copy(self.mole, "reference")
        self.must(launch("train", *self.flags("mole", 40), f"--workdir={ref}"))
        return curve(ref)

    def flags(self, kind: str, steps: int) -> list[str]:
        config = {"mole": "configs/mole.py:size=tiny,experts=2",
                  "moe": "configs/moe.py:size=tiny,experts=4,topk=2"}[kind]  # fmt: skip
        return [f"--config={config}", *self.common, f"--config.train.steps={steps}"]

    def train(self, kind: str, config: str, steps: int) -> Path:
        w = self.root / f"base_{kind}"
        self.must(launch("train", *self.flags(kind, steps), f"--workdir={w}"))
        return w

    def copy(self, src: Path, name: str) -> Path:
        dst = self.root / name
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        return dst

    @staticmethod
    def must(r: dict) -> dict:
        if r["rc"] != 0:
            raise SystemExit(f"setting up the campaign failed:\n{r['err'][-3000:]}")
        return r


def _kill(b: Base, rng, i, kind: str) -> dict:
    """SIGKILL or SIGTERM at a random point of train / export / eval / sweep, then again."""
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    when = rng.uniform(0.5, 9.0)
    w = b.copy(b.moe if kind == "eval" else b.mole, f"{kind}_{i}")
    newest = max(verified_checkpoints(w))
    if kind == "train":
        runs = [launch("train", *b.flags("mole", 40), f"--workdir={w}", kill_after=when, sig=sig)]
        runs.append(launch("train", *b.flags("mole", 40), f"--workdir={w}"))
        recovered = runs[-1]["rc"] == 0 and curve(w) == b.curve
    elif kind == "export":
        runs = [launch("export", f"--workdir={w}", "--dtype=float16", kill_after=when, sig=sig)]
        lost = 0 if store_ok(w, "lut") else 1  # the old store or the new one, complete
        runs += [launch("export", f"--workdir={w}", "--dtype=float16"),
                 launch("eval", f"--workdir={w}", "--offload", "--max_tokens=1024")]  # fmt: skip
        recovered = all(r["rc"] == 0 for r in runs[1:])
        lost += len(list(w.glob(".lut.*")))  # a hidden copy left behind (publish)
        return dict(_outcome(runs, recovered, lost, w, newest), landed=runs[0]["killed"])
    elif kind == "eval":
        runs = [launch("eval", f"--workdir={w}", "--offload", kill_after=when / 3, sig=sig)]
        runs.append(launch("eval", f"--workdir={w}", "--offload", "--max_tokens=1024"))
        recovered = runs[-1]["rc"] == 0 and store_ok(w, "experts")
    else:  # a sweep of two runs, its process group killed
        study = b.root / f"study_{i}.py"
        study.write_text(STUDY.format(common=[*b.common, "--config.train.steps=6"]))
        sw = b.root / f"sweep_{i}"
        runs = [launch("sweep", f"--config={study}", f"--workdir={sw}", kill_after=when, sig=sig)]
        runs.append(launch("sweep", f"--config={study}", f"--workdir={sw}"))
        done = json.loads((sw / "sweep.json").read_text()) if (sw / "sweep.json").exists() else {}
        recovered = runs[-1]["rc"] == 0 and done.get("complete", False)
    return dict(_outcome(runs, recovered, 0, w, newest), landed=runs[0]["killed"])


STUDY = '''"""A two-run study for the fault campaign."""
from ml_collections import ConfigDict

FLAGS = {common!r}


def get_config(arg=None):
    return ConfigDict(dict(steps=6))


def get_sweep(c):
    s = {{f.split("=")[0].removeprefix("--config."): f.split("=", 1)[1] for f in FLAGS}}
    return [dict(name="dense", config="configs/dense.py:size=tiny", set=s),
            dict(name="mole", config="configs/mole.py:size=tiny,experts=2", set=s)]
'''


def _outcome(runs, recovered: bool, lost: int, w: Path, newest: int) -> dict:
    if w.exists() and (w / "checkpoints").exists():
        lost += max(verified_checkpoints(w) or {0}) < newest  # progress went backwards
    return dict(recovered=bool(recovered), lost=int(lost),
                tracebacks=sum(r["traceback"] for r in runs),
                runs=[dict(rc=r["rc"], err=r["err"][-400:]) for r in runs])  # fmt: skip


def _damage(path: Path, rng) -> str:
    """Flips a few random bytes of `path`, or truncates it at a random length."""
    raw = bytearray(path.read_bytes())
    if not raw or rng.random() < 0.3:
        path.write_bytes(bytes(raw[: rng.randrange(len(raw))]) if raw else b"\x00")
        return "truncated"  # (strictly shorter: the fault always lands)
    for i in rng.sample(range(len(raw)), min(len(raw), rng.randint(1, 8))):
        raw[i] ^= 1 << rng.randrange(8)  # distinct bytes: flips never cancel
    path.write_bytes(bytes(raw))
    return "flipped"


def _files(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file())


def damage_checkpoint(b: Base, rng, i) -> dict:
    """The newest checkpoint (step 20) damaged: eval falls back to a verified step in one line;
    training (to the same 20 steps) retrains into step 20 on the original curve."""
    w = b.copy(b.mole, f"ckpt_{i}")
    _damage(rng.choice(_files(w / "checkpoints" / "20")), rng)
    runs = [launch("eval", f"--workdir={w}", "--max_tokens=1024")]
    lost = len({10, 15} - verified_checkpoints(w))  # the older steps must be untouched
    runs.append(launch("train", *b.flags("mole", 20), f"--workdir={w}"))
    recovered = runs[0]["rc"] == 0 and runs[-1]["rc"] == 0 and curve(w) == curve(b.mole)
    return dict(_outcome(runs, recovered, lost, w, 15), landed=True)


def damage_store(b: Base, rng, i, name: str) -> dict:
    """A LUT (MoLE) or expert store (MoE): refused in one line, or read with the same result;
    exported again, it serves."""
    w = b.copy(b.mole if name == "lut" else b.moe, f"{name}_{i}")
    clean = launch("eval", f"--workdir={w}", "--offload", "--max_tokens=1024")
    _damage(rng.choice(_files(w / name)), rng)
    runs = [launch("eval", f"--workdir={w}", "--offload", "--max_tokens=1024")]
    first = runs[0]
    honest = (first["rc"] == 2 and _one_error(first)) or (
        first["rc"] == 0 and first["out"] == clean["out"]
    )
    args = ["--dtype=float16"] if name == "lut" else ["--experts", "--dtype=float32"]
    runs += [launch("export", f"--workdir={w}", *args),
             launch("eval", f"--workdir={w}", "--offload", "--max_tokens=1024")]  # fmt: skip
    recovered = honest and runs[-1]["out"] == clean["out"] and runs[-1]["rc"] == 0
    return dict(_outcome(runs, recovered, 0 if honest else 1, w, 20), landed=True)


def damage_tokens(b: Base, rng, i) -> dict:
    """The token cache (shared by runs of a corpus): found corrupt, tokenised again."""
    w = b.copy(b.mole, f"tokens_{i}")
    cache = b.root / f"cache_{i}"
    shutil.copytree(b.root / "cache", cache)
    _damage(rng.choice(_files(cache / "tokens")), rng)
    flags = [*b.flags("mole", 40), f"--config.data.cache_dir={cache}"]
    runs = [launch("train", *flags, f"--workdir={w}")]
    return dict(_outcome(runs, runs[0]["rc"] == 0 and curve(w) == b.curve, 0, w, 20), landed=True)


def damage_config(b: Base, rng, i) -> dict:
    """config.json or tokenizer.json: refused in one line; train rewrites them."""
    w = b.copy(b.mole, f"config_{i}")
    how = _damage(w / rng.choice(["config.json", "tokenizer.json"]), rng)
    runs = [launch("eval", f"--workdir={w}", "--max_tokens=1024")]
    honest = runs[0]["rc"] == 2 and _one_error(runs[0])
    runs += [launch("train", *b.flags("mole", 40), f"--workdir={w}"),
             launch("eval", f"--workdir={w}", "--max_tokens=1024")]  # fmt: skip
    recovered = honest and runs[-1]["rc"] == 0 and curve(w) == b.curve
    return dict(_outcome(runs, recovered, 0 if honest else 1, w, 20), note=how, landed=True)


def disk_full(b: Base, rng, i) -> dict:
    """train or export under a file size limit: one line, nothing complete lost, then done."""
    w = b.copy(b.mole, f"disk_{i}")
    limit = rng.randint(4_000, 400_000)
    if i % 2 == 0:
        runs = [launch("train", *b.flags("mole", 40), f"--workdir={w}", fsize=limit)]
        runs.append(launch("train", *b.flags("mole", 40), f"--workdir={w}"))
        recovered = runs[-1]["rc"] == 0 and curve(w) == b.curve
    else:
        runs = [launch("export", f"--workdir={w}", "--dtype=float32", fsize=limit)]
        kept = store_ok(w, "lut")
        runs += [launch("export", f"--workdir={w}", "--dtype=float32"),
                 launch("eval", f"--workdir={w}", "--offload", "--max_tokens=1024")]  # fmt: skip
        recovered = kept and runs[-1]["rc"] == 0
    err = runs[0]["err"]
    hit = runs[0]["rc"] == 2 and ("disk is full" in err or "size limit" in err)
    honest = runs[0]["rc"] == 0 or (runs[0]["rc"] == 2 and _one_error(runs[0]))
    return dict(_outcome(runs, recovered and honest, 0, w, 20), landed=hit)


def two_writers(b: Base, rng, i) -> dict:
    w = b.copy(b.mole, f"writers_{i}")
    cmd = ["train", *b.flags("mole", 40), f"--workdir={w}"]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *cmd], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    time.sleep(rng.uniform(0, 0.5))
    outs = [p.communicate(timeout=600) for p in procs]
    runs = [dict(rc=p.returncode, out=o, err=e, traceback="Traceback" in e)
            for p, (o, e) in zip(procs, outs, strict=True)]  # fmt: skip
    refused = [r for r in runs if r["rc"] == 2 and "in use" in r["err"]]
    recovered = sorted(r["rc"] for r in runs) in ([0, 2], [0, 0]) and curve(w) == b.curve
    out = _outcome(runs, recovered and len(refused) <= 1, 0, w, 20)
    return dict(out, landed=len(refused) == 1)  # (both finishing: they never overlapped)


def _one_error(r: dict) -> bool:
    lines = r["err"].strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("error: ")


def check_invalid(b: Base, args: list[str]) -> dict:
    before = sorted(str(p) for p in b.moe.rglob("*"))
    r = launch(*args)
    ok = r["rc"] == 2 and _one_error(r) and not (b.root / "invalid_w" / "config.json").exists()
    shutil.rmtree(b.root / "invalid_w", ignore_errors=True)  # the next case starts clean
    ok = ok and sorted(str(p) for p in b.moe.rglob("*")) == before
    note = " ".join(a if isinstance(a, str) else repr(a) for a in args[:1] + args[2:])
    return dict(recovered=ok, lost=0, tracebacks=int(r["traceback"]), landed=True,
                note=note, rc=r["rc"], err=r["err"][-300:])  # fmt: skip


KINDS = {
    "kill_train": lambda b, rng, i: _kill(b, rng, i, "train"),
    "kill_export": lambda b, rng, i: _kill(b, rng, i, "export"),
    "kill_eval": lambda b, rng, i: _kill(b, rng, i, "eval"),
    "kill_sweep": lambda b, rng, i: _kill(b, rng, i, "sweep"),
    "damage_checkpoint": damage_checkpoint,
    "damage_lut": lambda b, rng, i: damage_store(b, rng, i, "lut"),
    "damage_experts": lambda b, rng, i: damage_store(b, rng, i, "experts"),
    "damage_tokens": damage_tokens,
    "damage_config": damage_config,
    "disk_full": disk_full,
    "two_writers": two_writers,
    "damage_metrics": damage_metrics,
    "damage_checksums": damage_checksums,
    "missing_shard": missing_shard,
    "diverge": diverge,
    "export_damaged": export_damaged,
    "read_only": read_only,
    "sigterm_multihost": sigterm_multihost,
}


def campaign(root: Path, n: int, seed: int, kinds: list[str]) -> dict[str, list[dict]]:
    b = Base(root)
    out: dict[str, list[dict]] = {}
    for kind in kinds:
        if kind == "invalid_input":
            out[kind] = [check_invalid(b, args) for args in invalid_inputs(b)]
        else:
            rng = random.Random(f"{seed}-{kind}")
            out[kind] = [KINDS[kind](b, rng, i) for i in range(n)]
        rows = out[kind]
        print(f"{kind:<18} {len(rows):3d} injected, {sum(r.get('landed', 0) for r in rows):3d} "
              f"landed, {sum(r['recovered'] for r in rows):3d} "
              f"recovered, {sum(r['lost'] for r in rows)} lost, "
              f"{sum(r['tracebacks'] for r in rows)} tracebacks", flush=True)  # fmt: skip
    return out


def main(_):
    logging.set_verbosity(logging.ERROR)  # orbax logs every checkpoint this process verifies
    kinds = FLAGS.kinds or [*KINDS, "invalid_input"]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out = campaign(Path(tmp), FLAGS.n, FLAGS.seed, kinds)
    print("\n" + faults_table(out))
    print(f"\n{time.time() - t0:.0f} s, seed {FLAGS.seed}")
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps(dict(seed=FLAGS.seed, n=FLAGS.n, faults=out),
                                               indent=2))  # fmt: skip


if __name__ == "__main__":
    app.run(main)
