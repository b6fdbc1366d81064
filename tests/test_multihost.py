"""Two real processes on 127.0.0.1 (jax.distributed, gloo CPU collectives, 4 host devices each)
train like one process with 8 devices; a run whose processes are killed resumes on the curve."""

import os
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


def _reference(corpus_dir, cache_dir, steps, workdir):
    cfg = moe.get_config("size=tiny,experts=4,topk=2")
    cfg = tiny_overrides(cfg, corpus_dir, cache_dir, steps=steps, eval_every=5, ckpt_every=5)
    cfg.unlock()
    cfg.mesh.update(MESH)
    loop.run(cfg, workdir)  # one process, the 8 devices of the test process
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def test_two_processes_train_like_one_and_resume_after_a_kill(corpus_dir, cache_dir, tmp_path):
    ref = _reference(corpus_dir, cache_dir, 12, str(tmp_path / "ref"))
    w = str(tmp_path / "two")
    procs = _start(w, corpus_dir, cache_dir, 12, _free_port())
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    got = _losses(w)
    assert sorted(got) == sorted(ref)
    for step, loss in ref.items():
        assert abs(got[step] - loss) <= 1e-5 * abs(loss), (step, got[step], loss)
    assert "trained to step 12" in outs[0] and "trained to step" not in outs[1]  # one reporter

    killed = str(tmp_path / "killed")
    procs = _start(killed, corpus_dir, cache_dir, 12, _free_port())
    deadline = time.time() + 300
    metrics = os.path.join(killed, "metrics.jsonl")
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 8:
            break
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)  # one host dies; the job is torn down
    time.sleep(0.5)
    procs[0].send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate()
    assert procs[1].returncode == -signal.SIGKILL, "the run ended before the kill"
    procs = _start(killed, corpus_dir, cache_dir, 12, _free_port())
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    resumed = _losses(killed)
    assert sorted(resumed) == sorted(ref)
    for step, loss in ref.items():
        assert abs(resumed[step] - loss) <= 1e-5 * abs(loss), (step, resumed[step], loss)
