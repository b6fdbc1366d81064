"""`launch.py` end to end in temporary workdirs: train, resume, SIGKILL, bad input, summary."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, tiny_overrides

from configs import dense
from mole_jax.train import loop
from mole_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def launch(*args, check=True, **kw):
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def train_until(flags, workdir: str, lines: int, **popen) -> subprocess.Popen:
    """A `launch.py train` process, returned once its metrics.jsonl holds `lines` lines (or it
    ended, or 240 s passed)."""
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "train", *flags, f"--workdir={workdir}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, **popen)
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= lines:
            break
        time.sleep(0.05)
    return proc


def cli_flags(corpus_dir, cache_dir):
    return [
        "--config=configs/dense.py:size=tiny",
        f"--config.data.corpus=files:{corpus_dir}/*.txt",
        f"--config.data.cache_dir={cache_dir}",
        "--config.data.vocab_size=512",
        "--config.model.vocab_size=512",
        "--config.data.seq_len=32",
        "--config.data.val_fraction=0.2",
        "--config.train.eval_batches=2",
        "--config.train.eval_every=20",
        "--config.train.ckpt_every=20",
    ]


def test_train_then_resume_with_more_steps(corpus_dir, cache_dir, tmp_path):
    w = str(tmp_path / "w")
    flags = cli_flags(corpus_dir, cache_dir)
    out = launch("train", *flags, f"--workdir={w}", "--config.train.steps=40")
    assert "trained to step 40" in out.stdout
    for name in ("config.json", "model_summary.json", "metrics.jsonl", "tb", "checkpoints"):
        assert os.path.exists(os.path.join(w, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(w, "tb")))
    rows = [r for r in read_metrics(w) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 41))
    assert sum(r["loss"] for r in rows[-5:]) < sum(r["loss"] for r in rows[:5])
    cfg = json.load(open(os.path.join(w, "config.json")))
    assert cfg["train"]["steps"] == 40 and cfg["data"]["seq_len"] == 32

    out = launch("train", *flags, f"--workdir={w}", "--config.train.steps=80")
    rows = [r for r in read_metrics(w) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 81))  # resumed at 41, no step repeated
    assert sorted(os.listdir(os.path.join(w, "checkpoints")))[-1] == "80"


def test_sigkill_mid_training_resumes_on_the_same_curve(corpus_dir, cache_dir, tmp_path):
    flags = cli_flags(corpus_dir, cache_dir) + [
        "--config.train.steps=60",
        "--config.train.ckpt_every=10",
    ]
    killed = str(tmp_path / "killed")
    proc = train_until(flags, killed, 35, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    launch("train", *flags, f"--workdir={killed}")

    ref = str(tmp_path / "ref")
    cfg = tiny_overrides(
        dense.get_config("size=tiny"), corpus_dir, cache_dir, steps=60, ckpt_every=10, eval_every=20
    )
    loop.run(cfg, ref)
    a = {r["step"]: r["loss"] for r in read_metrics(ref) if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(killed) if "loss" in r}
    assert sorted(b) == list(range(1, 61)) and a == b


def test_train_into_a_log_file_writes_a_progress_line_every_few_seconds(
    corpus_dir, cache_dir, tmp_path
):
    """`launch.py train ... > log.txt`: a line every few seconds from the start (while compiling
    too; lines every 3 s here instead of 10 to keep the test short), watched until two step
    lines with an ETA came (however slow the machine), then SIGTERM: the preemption checkpoint
    ends the log."""
    w, log = str(tmp_path / "w"), tmp_path / "log.txt"
    flags = cli_flags(corpus_dir, cache_dir) + ["--config.train.steps=1000000"]
    cmd = [sys.executable, os.path.join(ROOT, "launch.py"), "train", *flags, f"--workdir={w}"]

    def step_lines():
        lines = log.read_text().splitlines()
        return sum(line.startswith("train: step ") and "ETA" in line for line in lines)

    seen, start = [(time.time(), 0)], time.time()
    with open(log, "w") as out:
        env = dict(os.environ, MOLE_JAX_PROGRESS_EVERY_S="3")
        proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True, env=env
        )
        while proc.poll() is None and step_lines() < 2 and time.time() - start < 300:
            n = log.read_text().count("\n")
            if n > seen[-1][1]:
                seen.append((time.time(), n))
            time.sleep(0.2)
        assert proc.poll() is None, "the run ended while it was watched"
        seen.append((time.time(), None))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    assert proc.returncode == 143, proc.stderr[-2000:]
    lines = log.read_text().splitlines()
    # from the first line on (before it: Python and jax starting, not progress's business)
    assert seen[1][0] - seen[0][0] <= 60, (seen[:3], lines)
    gaps = [b[0] - a[0] for a, b in zip(seen[1:], seen[2:], strict=False)]
    assert max(gaps) <= 8, (gaps, lines)
    assert step_lines() >= 2, lines
    assert any("checkpoint" in line for line in lines[-3:]), lines


def test_bad_input_is_one_line_and_nonzero(tmp_path):
    cases = [
        ("--config=configs/dense.py:size=tiny", "--config.model.n_heads=5"),
        ("--config=configs/dense.py:size=giant",),
        ("--config=configs/dense.py:size=tiny", "--config.train.stepz=5"),
        ("--config=configs/dense.py:size=tiny", "--config.data.corpus=files:/no/such/*.txt"),
    ]
    for extra in cases:
        w = str(tmp_path / "w")
        proc = launch("train", *extra, f"--workdir={w}", check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (extra, proc.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (extra, proc.stderr[-2000:])
        assert not os.path.exists(os.path.join(w, "config.json"))


def test_summary_command_prints_and_writes_json(tmp_path):
    out = tmp_path / "s.json"
    proc = launch("summary", "--config=configs/dense.py:size=1b", f"--json={out}")
    s = json.loads(out.read_text())
    assert "params_total" in proc.stdout and abs(s["params_total"] / 1.01e9 - 1) < 0.02
