"""Fault kind of experiments/faults.py for multi-host training (issue 8).

sigterm_multihost: the MoLE run continued to step 40 by two real processes on 127.0.0.1
(`--coordinator --num_processes=2`, one CPU device each); SIGTERM to one of them (either, at
random) at a random time after the continued run has logged a step. Both processes must stop
at the same step within 120 s with exit status 143 (the one not signalled too), that step
checkpointed and verified; the same command run again finishes on the curve of an
uninterrupted two-process run (computed once per campaign). `landed`: both processes were still
running when the signal was sent.

The helpers come from the module that defined `b`'s class (faults, or __main__ when faults.py
runs as a script), as in _faults_more.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from _fault_checks import campaign_module, curve, verified_checkpoints

STOP_WITHIN_S = 120  # from the signal to both processes' exit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(b, w: Path, steps: int) -> list[subprocess.Popen]:
    """`launch.py train` as two processes of one run (each its own session)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    port, root = _free_port(), campaign_module(b).ROOT
    cmd = [sys.executable, str(root / "launch.py"), "train", *b.flags("mole", steps),
           f"--workdir={w}", f"--coordinator=127.0.0.1:{port}", "--num_processes=2"]  # fmt: skip
    return [subprocess.Popen([*cmd, f"--process_id={i}"], cwd=root, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
            for i in range(2)]  # fmt: skip


def _finish(procs, timeout: float) -> list[dict]:
    """Each process's status, output and whether stderr holds a traceback; a process still
    running after `timeout` seconds is killed (rc None: it hung)."""
    deadline, runs = time.time() + timeout, []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(0.0, deadline - time.time()))
            rc = p.returncode
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            (out, err), rc = p.communicate(), None
        runs.append(dict(rc=rc, out=out, err=err, traceback="Traceback" in err))
    return runs


def _under_way(w: Path, procs, after: int, timeout: float = 600) -> None:
    """Until metrics.jsonl logs a step past `after` (the run is training), or a process ended."""
    deadline = time.time() + timeout
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if any(s > after for s in curve(w)):
            return
        time.sleep(0.05)


def _reference(b) -> dict[int, float]:
    """The uninterrupted two-process curve to step 40 (once per campaign)."""
    if getattr(b, "multihost_curve", None) is None:
        w = b.copy(b.mole, "multihost_reference")
        runs = _finish(_start(b, w, 40), 900)
        b.must(dict(rc=max(r["rc"] if r["rc"] is not None else 1 for r in runs),
                    err="\n".join(r["err"] for r in runs)))  # fmt: skip
        b.multihost_curve = curve(w)
    return b.multihost_curve


def _close(a: dict, ref: dict) -> bool:
    return sorted(a) == sorted(ref) and all(abs(a[s] - v) <= 1e-5 * abs(v) for s, v in ref.items())


def sigterm_multihost(b, rng, i) -> dict:
    """SIGTERM to process 0 or 1 of a two-process `train` at a random time while it trains:
    both stop at one checkpointed step with status 143 in bounded time, and the run resumes on
    the uninterrupted two-process curve."""
    f, ref = campaign_module(b), _reference(b)
    w = b.copy(b.mole, f"multihost_{i}")
    newest, target = max(verified_checkpoints(w)), rng.choice([0, 1])
    procs = _start(b, w, 40)
    _under_way(w, procs, newest)
    time.sleep(rng.uniform(0.0, 3.0))
    landed = all(p.poll() is None for p in procs)  # the signal reaches a running run
    procs[target].send_signal(signal.SIGTERM)
    runs = _finish(procs, STOP_WITHIN_S)
    steps = [re.findall(r"stopped by SIGTERM at step (\d+)", r["err"]) for r in runs]
    step = int(steps[0][0]) if steps[0] else None
    agreed = [r["rc"] for r in runs] == [143, 143] and steps[0] == steps[1] and len(steps[0]) == 1
    agreed = agreed and step in verified_checkpoints(w) and max(verified_checkpoints(w)) == step
    runs += _finish(_start(b, w, 40), 900)
    recovered = agreed and all(r["rc"] == 0 for r in runs[2:]) and _close(curve(w), ref)
    out = f._outcome(runs, recovered, 0, w, newest)
    return dict(out, landed=landed, note=f"SIGTERM to process {target}; both stopped at {step}")
