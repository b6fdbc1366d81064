"""Two real processes on 127.0.0.1 (jax.distributed, gloo CPU collectives, 4 host devices each)
train like one process with 8 devices; a run whose processes are killed resumes on the curve; a
SIGTERM to either process stops both at the same step, checkpointed, with exit status 143."""

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT, tiny_overrides

from configs import moe
from mole_jax.train import loop
from mole_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow

MESH = dict(data=2, fsdp=2, expert=2, tensor=1)


def _flags(corpus_dir, cache_dir, steps):
    flags = [
        "--config=configs/moe.py:size=tiny,experts=4,topk=2",
        f"--config.data.corpus=files:{corpus_dir}/*.txt",
        f"--config.data.cache_dir={cache_dir}",
        "--config.data.vocab_size=512",
        "--config.model.vocab_size=512",
        "--config.data.seq_len=32",
        "--config.data.val_fraction=0.2",
        "--config.train.batch_size=16",
        "--config.train.eval_batches=2",
        "--config.train.eval_every=5",
        "--config.train.ckpt_every=5",
        "--config.train.async_ckpt=False",
        f"--config.train.steps={steps}",
    ]
    return flags + [f"--config.mesh.{k}={v}" for k, v in MESH.items()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, corpus_dir, cache_dir, steps, port):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    return [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(ROOT, "launch.py"),
                "train",
                *_flags(corpus_dir, cache_dir, steps),
                f"--workdir={workdir}",
                f"--coordinator=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]


@pytest.fixture(scope="module")
def reference(corpus_dir, cache_dir, tmp_path_factory):
    """The one-process curve to step 12 (computed once for the tests here)."""
    return _reference(corpus_dir, cache_dir, 12, str(tmp_path_factory.mktemp("ref")))


def _reference(corpus_dir, cache_dir, steps, workdir):
    cfg = moe.get_config("size=tiny,experts=4,topk=2")
    cfg = tiny_overrides(cfg, corpus_dir, cache_dir, steps=steps, eval_every=5, ckpt_every=5)
    cfg.unlock()
    cfg.mesh.update(MESH)
    loop.run(cfg, workdir)  # one process, the 8 devices of the test process
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def _on_curve(workdir, ref):
    got = _losses(workdir)
    assert sorted(got) == sorted(ref)
    for step, loss in ref.items():
        assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)


def test_two_processes_train_like_one_and_resume_after_a_kill(
    corpus_dir, cache_dir, tmp_path, reference
):
    """Killed mid-run and started again, the two processes' curve is the one process's to the
    last step: the steps before the kill and after it (one reporting process)."""
    killed = str(tmp_path / "killed")
    procs = _start(killed, corpus_dir, cache_dir, 12, _free_port())
    _wait_for_rows(killed, procs, 8)
    procs[1].send_signal(signal.SIGKILL)  # one host dies; the job is torn down
    time.sleep(0.5)
    procs[0].send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate()
    assert procs[1].returncode == -signal.SIGKILL, "the run ended before the kill"
    assert _losses(killed), "no step was trained before the kill"
    procs = _start(killed, corpus_dir, cache_dir, 12, _free_port())
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    _on_curve(killed, reference)
    assert "trained to step 12" in outs[0] and "trained to step" not in outs[1]  # one reporter


def _wait_for_rows(workdir, procs, rows, timeout=300):
    """Until metrics.jsonl holds `rows` rows (training is under way), or a process ended."""
    metrics, deadline = os.path.join(workdir, "metrics.jsonl"), time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= rows:
            return
        time.sleep(0.02)


@pytest.mark.parametrize("target", [0, 1])
def test_sigterm_to_either_process_stops_both_at_one_checkpointed_step(
    corpus_dir, cache_dir, tmp_path, reference, target
):
    """The scheduler's notice reaches one host: both processes agree on the step (an all-reduced
    flag, one step late), checkpoint it together and exit 143, the unsignalled one included;
    the run started again (once) continues on the uninterrupted curve."""
    w = str(tmp_path / "term")
    procs = _start(w, corpus_dir, cache_dir, 12, _free_port())
    _wait_for_rows(w, procs, 1)
    time.sleep(random.Random(f"sigterm-{target}").uniform(0, 0.5))
    running = [p.poll() is None for p in procs]
    procs[target].send_signal(signal.SIGTERM)
    sent = time.time()
    try:
        outs = [p.communicate(timeout=120)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the processes did not stop within 120 s of SIGTERM to process {target}")
    took = time.time() - sent
    assert all(running), "the run ended before the signal: the fault did not land"
    assert [p.returncode for p in procs] == [143, 143], outs[0][-3000:] + outs[1][-3000:]
    steps = [re.findall(r"stopped by SIGTERM at step (\d+)", out) for out in outs]
    assert steps[0] == steps[1] and len(steps[0]) == 1, steps
    step = int(steps[0][0])
    assert 1 <= step < 12 and took < 120, (step, took)
    assert step in _verified_checkpoints(w) and max(_verified_checkpoints(w)) == step
    if target == 0:
        return  # the resume after a stop is the same whichever process was signalled
    procs = _start(w, corpus_dir, cache_dir, 12, _free_port())
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    assert f"resuming from step {step} (of 12)" in outs[0]
    _on_curve(w, reference)


def _verified_checkpoints(workdir) -> set[int]:
    """The checkpoint steps that restore with their digests (in this process: 8 devices)."""
    from mole_jax.train.checkpoint import Checkpointer
    from mole_jax.train.trainer import setup
    from mole_jax.workdir import Workdir

    tr, ckpt = setup(Workdir(workdir).editable_config()), Checkpointer(workdir)
    try:
        return {s for s in ckpt.steps() if ckpt.restore(tr.abstract_state, step=s) is not None}
    finally:
        ckpt.close()
